"""The LLaVA-NeXT and OneVision prompts against the definitions they reproduce, token by token."""

from __future__ import annotations

from support.tiny_next import build_bytelevel_tokenizer
from vlmflow.prompts import ANSWER_SUFFIX, LLAMA3_SYSTEM, get_template

QUESTION = "Is the jar full or empty?"


def _paper_user_message(image: str = "<image>") -> str:
    return image + "\n" + QUESTION + ANSWER_SUFFIX  # the paper's qs


def test_llava_llama_3_is_metas_chat_template_plus_the_papers_suffix():
    """LLaVA-NeXT's conv ``llava_llama_3``: system + user turn through Meta-Llama-3-8B-Instruct's chat
    template with the generation prompt, then the paper's trailing " \\n"."""
    tok = build_bytelevel_tokenizer("llama3")
    messages = [{"role": "system", "content": LLAMA3_SYSTEM}, {"role": "user", "content": _paper_user_message()}]
    definition = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) + " \n"
    rendered = get_template("llava_llama_3").render(QUESTION, image_token="<image>")
    assert rendered.text == definition

    # Token by token as the original code tokenizes it (tokenizer_image_token: split on <image>, one
    # placeholder between the chunks), with a single BOS (the HF checkpoints' convention; the original
    # code's BOS handling may double it, see the paper notes).
    before, after = definition.split("<image>")
    expected = (
        tok(before, add_special_tokens=False)["input_ids"]
        + [tok.image_token_id]
        + tok(after, add_special_tokens=False)["input_ids"]
    )
    ours = tok(rendered.text, add_special_tokens=get_template("llava_llama_3").add_special_tokens)["input_ids"]
    assert ours == expected
    tokens = tok.convert_ids_to_tokens(ours)
    assert tokens[0] == "<|begin_of_text|>" and tokens.count("<|begin_of_text|>") == 1
    starts = [i for i, t in enumerate(tokens) if t == "<|start_header_id|>"]
    ends = [i for i, t in enumerate(tokens) if t == "<|end_header_id|>"]
    assert [tok.decode(ours[s + 1 : e]) for s, e in zip(starts, ends, strict=True)] == ["system", "user", "assistant"]
    assert tokens.count("<|eot_id|>") == 2
    # After the assistant header: "\n\n" from the template, then the paper's " \n"; Llama-3's
    # pre-tokenizer keeps the four characters together, so the last position ends that run.
    assert tok.decode(ours[ends[-1] + 1 :]) == "\n\n \n"
    assert [piece for piece, _ in tok.backend_tokenizer.pre_tokenizer.pre_tokenize_str("x\n\n \n")][-1] == "ĊĊĠĊ"


def test_qwen_1_5_is_llava_next_chatml_conversation():
    """LLaVA-NeXT's conv ``qwen_1_5`` (SeparatorStyle.CHATML) rendered the way its get_prompt does."""
    import vlmflow.adapters.llava_onevision  # noqa: F401  (registers the template)

    system, roles, sep = "<|im_start|>system\nYou are a helpful assistant.", ("<|im_start|>user", "<|im_start|>assistant"), "<|im_end|>"
    definition = system + sep + "\n"
    for role, message in ((roles[0], _paper_user_message()), (roles[1], None)):
        definition += role + "\n" + message + sep + "\n" if message else role + "\n"
    rendered = get_template("qwen_1_5").render(QUESTION, image_token="<image>")
    assert rendered.text == definition
    tok = build_bytelevel_tokenizer("qwen2")
    ids = tok(rendered.text, add_special_tokens=get_template("qwen_1_5").add_special_tokens)["input_ids"]
    tokens = tok.convert_ids_to_tokens(ids)
    assert tokens[0] == "<|im_start|>" and tokens.count("<|im_start|>") == 3 and tokens.count("<image>") == 1
