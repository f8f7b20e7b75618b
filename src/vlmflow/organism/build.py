"""Build an untrained organism: its word-level tokenizer, its processor and the LLaVA model.

The tokenizer has one token per word or punctuation mark of the scene questions and of the prompt
templates; answers are generated capitalised, the way Vicuna-based LLaVA answers ("Red"), so both
the lower-case word (in questions) and the capitalised one (as an answer) are tokens, and the
logit lens can follow both forms.

>>> tok = build_organism_tokenizer()
>>> tok.convert_ids_to_tokens(tok("Is the circle red or blue?")["input_ids"])
['<s>', 'Is', 'the', 'circle', 'red', 'or', 'blue', '?']
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from transformers import LlavaForConditionalGeneration, LlavaProcessor, PreTrainedTokenizerFast

from vlmflow.data.sample import TaskType
from vlmflow.data.scene_questions import ANSWERS, scene_question
from vlmflow.data.scenes import COLORS, SHAPES, SIZES
from vlmflow.prompts import ANSWER_SUFFIX, VICUNA_SYSTEM
from vlmflow.tiny.llava import TinyLlavaConfig, build_tiny_llava
from vlmflow.tiny.tokenizers import DEFAULT_CORPUS, build_tokenizer

#: The prompt template the organism is trained with (recorded in its ``vlmflow.json``).
TEMPLATE = "vicuna_nosys"


def answer_word(answer: str) -> str:
    """The word the organism generates for a gold answer: capitalised, like Vicuna (``"Red"``).

    >>> answer_word("left")
    'Left'
    """
    return answer.capitalize()


def all_answers() -> tuple[str, ...]:
    """Every gold answer of every task (lower case, sorted)."""
    return tuple(sorted({a for answers in ANSWERS.values() for a in answers}))


def organism_corpus() -> list[str]:
    """Text the tokenizer is trained on: the prompts, every word of the scene questions, the answers."""
    words = [*SHAPES, *COLORS, *SIZES, *all_answers()]
    corpus = list(DEFAULT_CORPUS)
    corpus.append(VICUNA_SYSTEM + " USER: ASSISTANT:" + ANSWER_SUFFIX)
    corpus.append(" ".join(words + [answer_word(w) for w in words]))
    # A few questions of every task bring in the template words ("Which", "common", "side", ...).
    for task in TaskType:
        corpus.extend(scene_question(task, seed=0, index=i).sample.question for i in range(40))
    return corpus


def build_organism_tokenizer() -> PreTrainedTokenizerFast:
    """The organism's word-level tokenizer (offline, deterministic)."""
    return build_tokenizer("word", organism_corpus())


@dataclass(frozen=True)
class OrganismShape:
    """Architecture of the organism.

    Attributes:
        layers / hidden / heads / kv_heads / intermediate: the Llama decoder.
        vision_layers / vision_hidden: the CLIP tower (4 heads, MLP twice as wide).
        image_size / patch_size: 64 / 16 gives 16 image tokens, one per grid cell of the scenes.
    """

    layers: int = 6
    hidden: int = 96
    heads: int = 4
    kv_heads: int = 4
    intermediate: int = 256
    vision_layers: int = 2
    vision_hidden: int = 96
    image_size: int = 64
    patch_size: int = 16


def build_organism(shape: OrganismShape = OrganismShape(), seed: int = 0) -> tuple[LlavaForConditionalGeneration, LlavaProcessor]:
    """An untrained organism (transformers' initialisation, seeded) and its processor.

    >>> model, processor = build_organism(OrganismShape(layers=2))
    >>> model.config.text_config.num_hidden_layers, processor.patch_size
    (2, 16)
    """
    # OrganismShape's fields are a subset of TinyLlavaConfig's, with the same meaning.
    config = TinyLlavaConfig(tokenizer="word", seed=seed, widen_init=False, **asdict(shape))
    return build_tiny_llava(config, tokenizer=build_organism_tokenizer())
