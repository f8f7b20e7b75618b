from __future__ import annotations

import pytest

from vlmflow.errors import ConfigError
from vlmflow.prompts import get_template


def test_vicuna_prompt_is_the_papers_exactly():
    p = get_template("vicuna_v1").render("Is the jar full or empty?", image_token="<image>")
    assert p.text == (
        "A chat between a curious user and an artificial intelligence assistant. The assistant gives "
        "helpful, detailed, and polite answers to the user's questions. USER: <image>\nIs the jar full or "
        "empty? \nAnswer the question using a single word or phrase. ASSISTANT:"
    )
    assert p.question == "Is the jar full or empty?"
    assert p.text[p.image_spans[0][0] : p.image_spans[0][1]] == "<image>"


def test_unknown_template_lists_valid_names():
    with pytest.raises(ConfigError, match="vicuna_v1"):
        get_template("alpaca")
