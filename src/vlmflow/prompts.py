"""Prompt templates, exactly as the paper's code builds them.

A :class:`PromptTemplate` turns a question into the full prompt text and records the character span
of the question inside it, so position finding never has to search detokenised text. The image
placeholder (``<image>`` for LLaVA) is supplied by the model's processor.

Templates are looked up by name (:func:`get_template`); each model family names its default, and a
checkpoint may name its own in ``vlmflow.json`` (the shipped organism does).
"""

from __future__ import annotations

from dataclasses import dataclass

from vlmflow.errors import ConfigError

#: The instruction the paper appends to every question (note the space before the newline).
ANSWER_SUFFIX = " \nAnswer the question using a single word or phrase."

VICUNA_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)

LLAMA3_SYSTEM = (
    "You are a helpful language and vision assistant. You are able to understand the visual content "
    "that the user provides, and assist the user with a variety of tasks using natural language."
)


@dataclass(frozen=True)
class RenderedPrompt:
    """A prompt and where its parts sit, in characters of ``text`` (half-open spans).

    ``image_spans`` are the spans of the image placeholders (before the processor expands them).
    """

    text: str
    question_span: tuple[int, int]
    image_spans: tuple[tuple[int, int], ...]

    @property
    def question(self) -> str:
        return self.text[self.question_span[0] : self.question_span[1]]


@dataclass(frozen=True)
class PromptTemplate:
    """A prompt with ``{image}`` and ``{question}`` slots.

    Attributes:
        name: registry key (``"vicuna_v1"``, ...).
        pattern: the text with exactly one ``{question}`` and any number of ``{image}`` slots.
        add_special_tokens: whether the tokenizer should add its own BOS (False when the pattern
            already starts with it, which avoids the double-BOS hazard of Llama-3 templates).

    >>> p = get_template("vicuna_v1").render("Is the jar full or empty?", image_token="<image>")
    >>> p.question
    'Is the jar full or empty?'
    >>> p.text.endswith("USER: <image>\\nIs the jar full or empty? \\nAnswer the question using a single word or phrase. ASSISTANT:")
    True
    """

    name: str
    pattern: str
    add_special_tokens: bool = True

    def render(self, question: str, *, image_token: str) -> RenderedPrompt:
        """Fill the slots; ``question`` is inserted verbatim."""
        text = ""
        question_span: tuple[int, int] | None = None
        image_spans: list[tuple[int, int]] = []
        rest = self.pattern
        while rest:
            head, brace, tail = rest.partition("{")
            text += head
            if not brace:
                break
            slot, close, rest = tail.partition("}")
            if not close:
                raise ConfigError(f"template {self.name!r} has an unclosed '{{'")
            if slot == "question":
                question_span = (len(text), len(text) + len(question))
                text += question
            elif slot == "image":
                image_spans.append((len(text), len(text) + len(image_token)))
                text += image_token
            else:
                raise ConfigError(f"template {self.name!r} has unknown slot {{{slot}}}; valid: image, question")
        if question_span is None:
            raise ConfigError(f"template {self.name!r} has no {{question}} slot")
        return RenderedPrompt(text=text, question_span=question_span, image_spans=tuple(image_spans))


_TEMPLATES: dict[str, PromptTemplate] = {}


def register_template(template: PromptTemplate) -> PromptTemplate:
    """Add a template to the registry (a later one with the same name replaces it)."""
    _TEMPLATES[template.name] = template
    return template


def get_template(name: str) -> PromptTemplate:
    """Look a template up by name.

    >>> get_template("vicuna_v1").name
    'vicuna_v1'
    """
    try:
        return _TEMPLATES[name]
    except KeyError:
        valid = ", ".join(sorted(_TEMPLATES))
        raise ConfigError(f"unknown prompt template {name!r}; valid: {valid}") from None


def template_names() -> list[str]:
    """Names of all registered templates."""
    return sorted(_TEMPLATES)


# conv_templates["vicuna_v1"] of the LLaVA code base (sep " ", sep2 "</s>"), with the paper's user
# message "<image>\n{question} \nAnswer the question using a single word or phrase."
register_template(
    PromptTemplate(
        name="vicuna_v1",
        pattern=VICUNA_SYSTEM + " USER: {image}\n{question}" + ANSWER_SUFFIX + " ASSISTANT:",
    )
)

# The same turn without the system prompt (shorter sequences; useful for small models).
register_template(
    PromptTemplate(
        name="vicuna_nosys",
        pattern="USER: {image}\n{question}" + ANSWER_SUFFIX + " ASSISTANT:",
    )
)

# Meta-Llama-3-8B-Instruct chat template with LLaVA-NeXT's system prompt, then the paper's trailing
# " \n" (without it llama3-llava-next's first generated token is "\n"). The pattern carries the BOS
# itself, so the tokenizer must not add another.
register_template(
    PromptTemplate(
        name="llava_llama_3",
        pattern=(
            "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n"
            + LLAMA3_SYSTEM
            + "<|eot_id|><|start_header_id|>user<|end_header_id|>\n\n{image}\n{question}"
            + ANSWER_SUFFIX
            + "<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n \n"
        ),
        add_special_tokens=False,
    )
)
