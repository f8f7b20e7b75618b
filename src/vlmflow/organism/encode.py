"""Fast batch encoding of scene questions for training and evaluating the organism.

The processor is the reference (it is what every user path goes through), but calling it for every
training batch costs as much as the step itself. :class:`BatchEncoder` produces the same input ids
and pixel values from cached prompt token ids and a NumPy normalisation;
:meth:`BatchEncoder.check_against_processor` proves the equality on real questions, and training
calls it before the first step.

Batches are right-padded: every row is ``prompt (+ answer token)`` followed by padding, so a causal
model needs no attention mask, and ``last[b]`` is the index of row ``b``'s last prompt token.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from vlmflow.data.scene_questions import SceneQuestion
from vlmflow.organism.build import answer_word
from vlmflow.prompts import PromptTemplate


@dataclass
class QuestionBatch:
    """Encoded questions.

    Attributes:
        input_ids: ``[B, T]``; prompts, then (with answers) the answer token, then padding.
        pixel_values: ``[B, 3, H, W]`` normalised like the processor does.
        last: ``[B]`` index of each row's last prompt position (it predicts the answer).
        answer_ids: ``[B]`` token id of each capitalised answer.
        questions: the questions, in row order.
    """

    input_ids: torch.Tensor
    pixel_values: torch.Tensor
    last: torch.Tensor
    answer_ids: torch.Tensor
    questions: Sequence[SceneQuestion]


class BatchEncoder:
    """Encode scene questions for a LLaVA processor and prompt template, without the processor.

    >>> encoder = BatchEncoder(processor, get_template("vicuna_nosys"))   # doctest: +SKIP
    >>> batch = encoder.encode(questions, with_answers=True)              # doctest: +SKIP
    """

    def __init__(self, processor: object, template: PromptTemplate) -> None:
        self.processor = processor
        self.template = template
        self.tokenizer = processor.tokenizer  # type: ignore[attr-defined]
        image_processor = processor.image_processor  # type: ignore[attr-defined]
        crop = image_processor.crop_size
        self.image_size = int(crop["height"] if isinstance(crop, dict) else crop.height)
        patch = int(processor.patch_size)  # type: ignore[attr-defined]
        extra = int(getattr(processor, "num_additional_image_tokens", 0))
        strategy = getattr(processor, "vision_feature_select_strategy", "default")
        self.n_image_tokens = (self.image_size // patch) ** 2 + extra - (1 if strategy == "default" else 0)
        self.image_token_id = int(self.tokenizer.convert_tokens_to_ids(processor.image_token))  # type: ignore[attr-defined]
        self.pad_id = int(self.tokenizer.pad_token_id)
        self.eos_id = int(self.tokenizer.eos_token_id)
        scale = float(image_processor.rescale_factor)
        mean = np.asarray(image_processor.image_mean, dtype=np.float32)
        std = np.asarray(image_processor.image_std, dtype=np.float32)
        # (pixel * scale - mean) / std == pixel * a + b, per channel
        self._a = (scale / std).astype(np.float32)
        self._b = (-mean / std).astype(np.float32)
        self._prompt_cache: dict[str, list[int]] = {}
        self._answer_cache: dict[str, int] = {}

    def prompt_ids(self, question: str) -> list[int]:
        """Token ids of the full prompt for ``question``, image placeholder expanded."""
        ids = self._prompt_cache.get(question)
        if ids is None:
            rendered = self.template.render(question, image_token=self.processor.image_token)  # type: ignore[attr-defined]
            raw = self.tokenizer(rendered.text, add_special_tokens=self.template.add_special_tokens)["input_ids"]
            ids = []
            for token in raw:
                ids.extend([token] * self.n_image_tokens if token == self.image_token_id else [token])
            self._prompt_cache[question] = ids
        return ids

    def answer_id(self, answer: str) -> int:
        """Token id of the capitalised answer word; raises if the tokenizer lacks it."""
        if answer not in self._answer_cache:
            word = answer_word(answer)
            token = self.tokenizer.convert_tokens_to_ids(word)
            if token is None or token == self.tokenizer.unk_token_id:
                raise ValueError(f"answer {word!r} is not a token of the organism's tokenizer")
            self._answer_cache[answer] = int(token)
        return self._answer_cache[answer]

    def pixels(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """``[B, 3, H, W]`` float32, as the processor normalises an image already at its view size."""
        array = np.stack([np.asarray(im.convert("RGB"), dtype=np.float32) for im in images])  # [B, H, W, 3]
        if array.shape[1:3] != (self.image_size, self.image_size):
            raise ValueError(f"images must be {self.image_size}x{self.image_size}, got {array.shape[2]}x{array.shape[1]}")
        return torch.from_numpy(np.ascontiguousarray((array * self._a + self._b).transpose(0, 3, 1, 2)))

    def encode(self, questions: Sequence[SceneQuestion], *, with_answers: bool) -> QuestionBatch:
        """Encode questions (rendering their scenes); append the answer token when ``with_answers``."""
        prompts = [self.prompt_ids(q.sample.question) for q in questions]
        answers = [self.answer_id(q.sample.answer) for q in questions]
        width = max(len(p) for p in prompts) + (1 if with_answers else 0)
        ids = torch.full((len(questions), width), self.pad_id, dtype=torch.long)
        for row, (prompt, answer) in enumerate(zip(prompts, answers, strict=True)):
            ids[row, : len(prompt)] = torch.tensor(prompt)
            if with_answers:
                ids[row, len(prompt)] = answer
        return QuestionBatch(
            input_ids=ids,
            pixel_values=self.pixels([q.scene.render() for q in questions]),
            last=torch.tensor([len(p) - 1 for p in prompts]),
            answer_ids=torch.tensor(answers),
            questions=questions,
        )

    def check_against_processor(self, questions: Sequence[SceneQuestion]) -> None:
        """Raise ``AssertionError`` unless the processor encodes ``questions`` exactly as :meth:`encode`."""
        batch = self.encode(questions, with_answers=False)
        for row, question in enumerate(questions):
            rendered = self.template.render(question.sample.question, image_token=self.processor.image_token)  # type: ignore[attr-defined]
            reference = self.processor(  # type: ignore[operator]
                text=[rendered.text],
                images=[question.scene.render()],
                return_tensors="pt",
                add_special_tokens=self.template.add_special_tokens,
            )
            n = int(batch.last[row]) + 1
            if not torch.equal(reference["input_ids"][0], batch.input_ids[row, :n]):
                raise AssertionError(f"token ids differ from the processor's for {question.sample.question!r}")
            diff = float((reference["pixel_values"][0] - batch.pixel_values[row]).abs().max())
            if diff > 1e-5:
                raise AssertionError(f"pixel values differ from the processor's by {diff:g}")
