"""Benchmark workloads: the paper's models as shapes, built with random weights, plus one GQA sample.

The cost of a forward pass does not depend on the weights' values, so a model of the right shape
with random weights costs what the real checkpoint costs. Three shapes, after the paper's models:

* ``llava15``  LLaVA-1.5-7b: CLIP ViT-L/14 at 336 px (576 image tokens) + Llama-2-7B (32 layers);
* ``next``     LLaVA-NeXT-8b: ~2.3k image tokens + Llama-3-8B (32 layers, 8 KV heads). Built as a
  LLaVA-1.5-architecture model with a 672 px view (48 x 48 = 2304 image tokens), which costs the same
  in the decoder as the anyres base view + grid + newline tokens of the real model (2,144-2,928);
* ``13b``      LLaVA-1.5-13b: 576 image tokens + Llama-2-13B (40 layers, window 9).

``full`` gives the real widths (for a GPU, in bfloat16); ``cpu`` divides every width by 16 (heads
and head counts scale with it, depth and sequence length do not), which keeps depth, sequence
lengths, windows and the knockout plan of the real model, and the vision tower's share of the work.

The prompt is the paper's vicuna_v1 prompt around a ChooseAttr question of median length in the
released data (58 text tokens with the offline SentencePiece-style tokenizer; the real Llama-2
tokenizer gives about the same), so a LLaVA-1.5 sequence has 634 positions (the paper: ~650).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, replace

import torch
from PIL import Image
from transformers import LlavaForConditionalGeneration

from vlmflow.data.sample import Box, Sample, SceneObject, TaskType
from vlmflow.experiments.prepare import PreparedSample, prepare_sample
from vlmflow.loading import LoadedModel
from vlmflow.tiny.llava import TinyLlavaConfig, build_tiny_llava, loaded_from_objects


@dataclass(frozen=True)
class Shape:
    """A LLaVA model shape: decoder, vision tower and view, and the paper's window for its depth."""

    name: str
    title: str
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    view: int  # square side the vision tower sees (336 -> 576 image tokens, 672 -> 2304)
    window: int
    patch: int = 14
    vision_layers: int = 24
    vision_hidden: int = 1024
    vision_heads: int = 16
    vision_intermediate: int = 4096

    @property
    def image_tokens(self) -> int:
        return (self.view // self.patch) ** 2

    def scaled(self, divisor: int) -> Shape:
        """The same shape with every width (and head count) divided by ``divisor``."""
        if divisor == 1:
            return self
        return replace(
            self,
            hidden=self.hidden // divisor,
            heads=max(1, self.heads // divisor),
            kv_heads=max(1, self.kv_heads // divisor),
            intermediate=self.intermediate // divisor,
            vision_hidden=self.vision_hidden // divisor,
            vision_heads=max(1, self.vision_heads // divisor),
            vision_intermediate=self.vision_intermediate // divisor,
        )


#: The paper's models at full width (the decoder and vision dims of the HF checkpoints' configs).
FULL_SHAPES: dict[str, Shape] = {
    "llava15": Shape("llava15", "LLaVA-1.5-7b shape", 32, 4096, 32, 32, 11008, 32064, 336, window=7),
    "next": Shape("next", "LLaVA-NeXT-8b shape (2304 image tokens)", 32, 4096, 32, 8, 14336, 128320, 672, window=7),
    "13b": Shape("13b", "LLaVA-1.5-13b shape", 40, 5120, 40, 40, 13824, 32064, 336, window=9),
}

#: CPU widths: every width / 8 (hidden 512 for 7B/8B, 640 for 13B; head_dim stays 128). The
#: ratio to the baseline depends on the width: a recomputed row scores all keys, so its attention
#: weighs against its projections and MLP as 21% at width 512 and 634 keys, 41% at width 256, 3% at
#: the real 4096. /8 halves /16's distance from the real model's proportions for twice the CPU time
#: (``--divisor 16`` for a faster, more pessimistic run).
CPU_DIVISOR = 8

#: A median-length ChooseAttr question of the released data, with its image size and object box.
QUESTION = "Which color is the shirt, black or green?"


def bench_sample() -> Sample:
    """The benchmark's GQA sample (answer ``black``)."""
    return Sample(
        "bench-choose-attr", "bench-image", QUESTION, "black", task=TaskType.CHOOSE_ATTR,
        true_option="black", false_option="green",
        objects=(SceneObject("shirt", "1", Box(324, 137, 132, 236)),), image_size=(500, 375),
    )


def bench_image() -> Image.Image:
    """A 500x375 image with some structure (the vision tower's cost does not depend on it)."""
    gen = torch.Generator().manual_seed(0)
    pixels = (torch.rand(375, 500, 3, generator=gen) * 255).to(torch.uint8).numpy()
    return Image.fromarray(pixels, "RGB")


def build_model(
    shape: Shape,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    attn: str = "sdpa",
    seed: int = 0,
) -> LoadedModel:
    """A random-weight LLaVA of ``shape`` on ``device`` in ``dtype``, wrapped for vlmflow.

    The tokenizer and processor are the offline tiny ones (SentencePiece-style); the vocabulary is
    padded to the real model's size so the embedding and unembedding cost and weigh what they do.
    Weights are drawn once, on the device, with standard deviation ``1/sqrt(fan_in)`` (not HF's
    0.02) so that knockouts visibly move the output, which the correctness check needs; the model is
    built without transformers' own initialisation (a 13B shape would otherwise be drawn twice).
    Norm weights are 1, biases 0.
    """
    from transformers.initialization import no_init_weights

    tiny = TinyLlavaConfig(
        layers=1, hidden=32, heads=2, kv_heads=1, intermediate=32, image_size=shape.view,
        patch_size=shape.patch, vision_layers=1, vision_hidden=32, attn_implementation=attn,
    )
    small, processor = build_tiny_llava(tiny)
    config = copy.deepcopy(small.config)
    del small
    text, vision = config.text_config, config.vision_config
    text.hidden_size, text.intermediate_size = shape.hidden, shape.intermediate
    text.num_hidden_layers, text.num_attention_heads = shape.layers, shape.heads
    text.num_key_value_heads, text.vocab_size = shape.kv_heads, shape.vocab
    text.head_dim = shape.hidden // shape.heads
    vision.hidden_size, vision.intermediate_size = shape.vision_hidden, shape.vision_intermediate
    vision.num_hidden_layers, vision.num_attention_heads = shape.vision_layers, shape.vision_heads
    config._attn_implementation = attn  # noqa: SLF001
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        default = torch.get_default_dtype()
        torch.set_default_dtype(dtype)
        try:
            with torch.device(device), no_init_weights():
                model = LlavaForConditionalGeneration(config)
        finally:
            torch.set_default_dtype(default)
        generator = torch.Generator(device=device).manual_seed(seed)
        with torch.no_grad():
            for name, param in model.named_parameters():
                if param.dim() >= 2:
                    param.normal_(0.0, param[0].numel() ** -0.5, generator=generator)
                elif name.endswith("bias"):
                    param.zero_()
                elif "norm" in name:
                    param.fill_(1.0)
                else:  # e.g. the vision tower's class embedding
                    param.normal_(0.0, param.numel() ** -0.5, generator=generator)
    model.eval()
    model.config._attn_implementation = attn  # noqa: SLF001
    return loaded_from_objects(model, processor)


#: Other median-length questions of the same task for batches of samples (their answers differ, and
#: their lengths by a token or two with the offline tokenizer).
BATCH_QUESTIONS = (
    ("Which color is the jacket, white or blue?", "white", "blue"),
    ("Which color is the car, red or silver?", "red", "silver"),
    ("Which color is the table, brown or black?", "brown", "black"),
    ("Which color is the bag, blue or yellow?", "blue", "yellow"),
    ("Which color is the sign, green or white?", "green", "white"),
    ("Which color is the shirt, gray or orange?", "gray", "orange"),
    ("Which color is the door, red or brown?", "red", "brown"),
)


def bench_samples(count: int) -> list[Sample]:
    """``count`` samples: the benchmark's sample first, then others of the same task and length."""
    base = bench_sample()
    out = [base]
    for i in range(count - 1):
        question, answer, other = BATCH_QUESTIONS[i % len(BATCH_QUESTIONS)]
        out.append(replace(base, sample_id=f"bench-{i + 2}", question=question, answer=answer, true_option=answer, false_option=other))
    return out


def prepare(loaded: LoadedModel, count: int | None = None) -> PreparedSample | list[PreparedSample]:
    """Encode the benchmark sample (or ``count`` benchmark samples) for ``loaded`` and resolve the position groups."""
    if count is None:
        return prepare_sample(loaded, bench_sample(), bench_image())
    return [prepare_sample(loaded, sample, bench_image()) for sample in bench_samples(count)]
