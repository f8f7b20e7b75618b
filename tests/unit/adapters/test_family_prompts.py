"""Prompts and image tokens of Qwen2-VL, Qwen3-VL, Gemma-3, Idefics3 and SmolVLM, checked against transformers'
own processors (where they can be built here) and the families' chat formats."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from support.tiny_gemma3 import TinyGemma3Config, build_tiny_gemma3
from support.tiny_idefics3 import TinyIdefics3Config, build_tiny_idefics3
from support.tiny_qwen2_vl import TinyQwen2VLConfig, build_tiny_qwen2_vl
from support.tiny_qwen3_vl import TinyQwen3VLConfig, build_tiny_qwen3_vl
from vlmflow.adapters.expansion import ImageTextProcessor, check_template_tokens
from vlmflow.adapters.registry import family_for_architecture, family_for_model
from vlmflow.errors import ConfigError, UnsupportedModelError
from vlmflow.prompts import ANSWER_SUFFIX, get_template

QUESTION = "Is the square red or blue?"


def _image(size=(40, 30)) -> Image.Image:
    return Image.new("RGB", size, (200, 30, 30))


def _bind(model, processor, template: str):
    """The family's input pipeline and decoder map bound to an in-memory model."""
    family = family_for_model(model)  # importing the family registers its templates
    return family.bind(model, processor, get_template(template), {})


@pytest.fixture(scope="module")
def idefics3():
    return build_tiny_idefics3(TinyIdefics3Config(layers=1))


@pytest.mark.parametrize("size", [(40, 30), (30, 70), (12, 9), (64, 16)])
def test_idefics3_expansion_equals_the_idefics3_processor(idefics3, size):
    model, processor = idefics3
    parts = ImageTextProcessor(processor.image_processor, processor.tokenizer)
    bound = _bind(model, parts, "idefics3")
    template = get_template("idefics3")
    encoded = bound.inputs.encode(QUESTION, _image(size))
    rendered = template.render(QUESTION, image_token=processor.image_token).text
    real = processor(images=[_image(size)], text=rendered, return_tensors="pt", add_special_tokens=False)
    assert encoded.input_ids.tolist() == real["input_ids"][0].tolist()
    torch.testing.assert_close(encoded.inputs["pixel_values"], real["pixel_values"], atol=0, rtol=0)
    assert encoded.text.startswith("<|begin_of_text|>User:<fake_token_around_image>")
    assert encoded.text.endswith(QUESTION + ANSWER_SUFFIX + "<end_of_utterance>\nAssistant:")
    layout = bound.inputs.image_layout(encoded)
    assert layout.n_tokens == int((encoded.input_ids == model.config.image_token_id).sum())


@pytest.mark.parametrize(("rows", "cols"), [(0, 0), (1, 2), (3, 4), (2, 1)])
def test_smolvlm_expansion_equals_the_smolvlm_processor_function(rows, cols):
    from transformers.models.smolvlm.processing_smolvlm import get_image_prompt_string

    from vlmflow.adapters.idefics3 import split_image_prompt

    real = get_image_prompt_string(rows, cols, 5, "<fake_token_around_image>", "<image>", "<global-img>")
    assert split_image_prompt(rows, cols, 5) == real


@pytest.mark.parametrize("size", [(40, 30), (9, 90), (64, 64)])
def test_qwen2_vl_prompt_and_image_pad_count(size):
    from transformers import Qwen2VLProcessor

    model, processor = build_tiny_qwen2_vl(TinyQwen2VLConfig(layers=1))
    bound = _bind(model, processor, "qwen2_vl")
    encoded = bound.inputs.encode(QUESTION, _image(size))
    grid = encoded.inputs["image_grid_thw"]
    # The real processor's replacement rule, run on this image's grid.
    ip = processor.image_processor
    fake_self = type("P", (), {"image_processor": ip, "image_token": "<|image_pad|>"})()
    expected = Qwen2VLProcessor.replace_image_token(fake_self, {"image_grid_thw": grid}, 0)
    pads = "<|vision_start|>" + expected + "<|vision_end|>"
    assert encoded.text == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
        + pads + QUESTION + ANSWER_SUFFIX + "<|im_end|>\n<|im_start|>assistant\n"
    )
    image_mask = encoded.input_ids == model.config.image_token_id
    assert torch.equal(encoded.inputs["mm_token_type_ids"][0].bool().cpu(), image_mask)
    assert int(image_mask.sum()) == bound.inputs.image_layout(encoded).n_tokens
    # M-RoPE: the image tokens' height/width ids walk the merged grid, text continues after it.
    pos = bound.decoder.position_ids(encoded)[:, 0]  # [3, seq]
    h, w = int(grid[0, 1]) // 2, int(grid[0, 2]) // 2
    first = int(torch.nonzero(image_mask)[0])
    image_pos = pos[:, image_mask]
    assert torch.equal(image_pos[1] - first, torch.arange(h).repeat_interleave(w))
    assert torch.equal(image_pos[2] - first, torch.arange(w).repeat(h))
    assert int(pos[0, -1]) == int(pos[:, image_mask].max()) + (len(pos[0]) - int(torch.nonzero(image_mask)[-1]) - 1)


@pytest.mark.parametrize("size", [(40, 30), (9, 90), (64, 64), (200, 120)])
def test_qwen3_vl_prompt_image_pad_count_and_interleaved_mrope_ids(size):
    from transformers import Qwen3VLProcessor

    model, processor = build_tiny_qwen3_vl(TinyQwen3VLConfig(layers=1))
    bound = _bind(model, processor, "qwen3_vl")
    encoded = bound.inputs.encode(QUESTION, _image(size))
    grid = encoded.inputs["image_grid_thw"]
    ip = processor.image_processor
    fake_self = type("P", (), {"image_processor": ip, "image_token": "<|image_pad|>"})()
    expected = Qwen3VLProcessor.replace_image_token(fake_self, {"image_grid_thw": grid}, 0)
    # No system turn: the Qwen3-VL chat template adds one only when the conversation has it.
    assert encoded.text == (
        "<|im_start|>user\n<|vision_start|>" + expected + "<|vision_end|>" + QUESTION + ANSWER_SUFFIX
        + "<|im_end|>\n<|im_start|>assistant\n"
    )
    image_mask = encoded.input_ids == model.config.image_token_id
    # The image processor's own count of patches for this size, merged 2 x 2.
    patches = ip.get_number_of_image_patches(size[1], size[0], {})
    assert int(image_mask.sum()) == patches // ip.merge_size**2 == bound.inputs.image_layout(encoded).n_tokens
    pos = bound.decoder.position_ids(encoded)[:, 0]  # [3, seq], from the model's get_rope_index
    h, w = int(grid[0, 1]) // 2, int(grid[0, 2]) // 2
    first = int(torch.nonzero(image_mask)[0])
    assert torch.equal(pos[1, image_mask] - first, torch.arange(h).repeat_interleave(w))
    assert torch.equal(pos[2, image_mask] - first, torch.arange(w).repeat(h))
    # The rotary embedding interleaves the axes: a frequency slot reads the height or width id
    # (slots 1, 4, ... and 2, 5, ...) instead of a contiguous block per axis as in Qwen2-VL.
    x = torch.zeros(1, len(pos[0]), model.config.text_config.hidden_size)
    cos, _ = bound.decoder.rotary(x, pos[:, None])
    inv = bound.decoder.language_model.rotary_emb.inv_freq
    row = int(torch.nonzero(image_mask)[-1])
    torch.testing.assert_close(cos[0, row, 1], torch.cos(pos[1, row] * inv[1]))
    torch.testing.assert_close(cos[0, row, 2], torch.cos(pos[2, row] * inv[2]))
    torch.testing.assert_close(cos[0, row, 0], torch.cos(pos[0, row] * inv[0]))


@pytest.mark.parametrize("size", [(40, 30), (30, 70), (12, 9), (200, 50)])
def test_internvl_prompt_tiles_and_thumbnail_equal_the_internvl_processor(size):
    from support.tiny_internvl import TinyInternVLConfig, build_tiny_internvl

    model, processor = build_tiny_internvl(TinyInternVLConfig(layers=1))
    bound = _bind(model, processor, "internvl")
    encoded = bound.inputs.encode(QUESTION, _image(size))
    # The HF InternVL chat template for one user turn with an image and a text part.
    chat = "<|im_start|>user\n<IMG_CONTEXT>\n" + QUESTION + ANSWER_SUFFIX + "<|im_end|>\n<|im_start|>assistant\n"
    real = processor(images=[_image(size)], text=chat, return_tensors="pt")
    assert encoded.input_ids.tolist() == real["input_ids"][0].tolist()
    torch.testing.assert_close(encoded.inputs["pixel_values"], real["pixel_values"], atol=0, rtol=0)
    tiles = processor.image_processor.get_number_of_image_patches(size[1], size[0], {"crop_to_patches": True})
    n_image = int((encoded.input_ids == model.config.image_token_id).sum())
    assert n_image == 16 * tiles == bound.inputs.image_layout(encoded).n_tokens
    assert encoded.text.count("<img>") == encoded.text.count("</img>") == 1


def test_gemma3_prompt_is_one_chat_turn_with_the_image_block():
    model, processor = build_tiny_gemma3(TinyGemma3Config(layers=1, layer_types=("full_attention",)))
    encoded = _bind(model, processor, "gemma3").inputs.encode(QUESTION, _image())
    soft = "<image_soft_token>" * 16
    assert encoded.text == (
        "<bos><start_of_turn>user\n\n\n<start_of_image>" + soft + "<end_of_image>\n\n"
        + QUESTION + ANSWER_SUFFIX + "<end_of_turn>\n<start_of_turn>model\n"
    )
    bos = processor.tokenizer.convert_tokens_to_ids("<bos>")
    assert encoded.input_ids[0] == bos and int((encoded.input_ids == bos).sum()) == 1
    image_mask = encoded.input_ids == model.config.image_token_id
    assert torch.equal(encoded.inputs["token_type_ids"][0].bool().cpu(), image_mask)


def test_paligemma_prompt_equals_the_paligemma_processor():
    from support.tiny_paligemma import TinyPaliGemmaConfig, build_tiny_paligemma

    model, processor = build_tiny_paligemma(TinyPaliGemmaConfig(layers=1))
    encoded = _bind(model, processor, "paligemma").inputs.encode(QUESTION, _image())
    real = processor(images=[_image()], text="<image>answer en " + QUESTION, return_tensors="pt")
    assert encoded.input_ids.tolist() == real["input_ids"][0].tolist()
    assert torch.equal(encoded.inputs["token_type_ids"].cpu(), real["token_type_ids"])
    torch.testing.assert_close(encoded.inputs["pixel_values"], real["pixel_values"], atol=0, rtol=0)
    assert encoded.text.endswith("<s>answer en " + QUESTION + "\n")


def test_a_template_from_another_checkpoint_is_refused():
    _, processor = build_tiny_gemma3(TinyGemma3Config(layers=1, layer_types=("full_attention",)))
    with pytest.raises(ConfigError, match=r"<\|im_start\|>.*another checkpoint"):
        check_template_tokens(processor.tokenizer, get_template("qwen2_vl"))
    check_template_tokens(processor.tokenizer, get_template("gemma3"))


def test_unsupported_settings_and_families_are_refused_with_the_reason():
    model, processor = build_tiny_gemma3(TinyGemma3Config(layers=1, layer_types=("full_attention",)))
    processor.image_processor.do_pan_and_scan = True
    with pytest.raises(ConfigError, match="pan-and-scan"):
        _bind(model, processor, "gemma3")
    qwen, _ = build_tiny_qwen2_vl(TinyQwen2VLConfig(layers=1))
    qwen.model.language_model.config.layer_types = ["sliding_attention"]
    with pytest.raises(UnsupportedModelError, match="sliding"):
        family_for_model(qwen).decoder_class(qwen).check_attention_backend()
    for architecture, reason in [
        ("MllamaForConditionalGeneration", "cross-attention"),
        ("Llama4ForConditionalGeneration", "chunked local attention"),
        ("Gemma3nForConditionalGeneration", "per-layer inputs"),
    ]:
        with pytest.raises(UnsupportedModelError, match=reason):
            family_for_architecture(architecture)


def test_models_command_lists_every_family_with_how_it_was_verified(capsys):
    import json

    from vlmflow.cli.main import main

    assert main(["models", "--json"]) == 0
    rows = {row["family"]: row for row in json.loads(capsys.readouterr().out)}
    for family in ("llava", "llava_next", "llava_onevision", "qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe", "gemma3",
                   "paligemma", "idefics3", "smolvlm", "internvl"):
        assert rows[family]["supported"] and rows[family]["verified"] and rows[family]["box mapping"]
    for family, row in rows.items():  # every supported family says how it was verified
        assert not row["supported"] or all(row[aspect] for aspect in ("prompt", "groups", "fast engine", "verified")), family
    assert not rows["mllama"]["supported"] and "cross-attention" in rows["mllama"]["refused_because"]
    assert rows["qwen3_vl"]["supported"] and rows["internvl"]["supported"] and rows["qwen3_vl_moe"]["supported"]
    assert {f for f, r in rows.items() if r["video"]} == {"qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe", "llava_onevision"}
    assert all(r["several_images"] == r["supported"] for r in rows.values())
    assert main(["models"]) == 0
    text = capsys.readouterr().out
    assert "gemma3" in text and "refused" in text and "inputs: one or several images; video (frames)" in text


TWO = [(40, 30), (30, 70)]


def test_two_image_prompts_equal_the_idefics3_and_paligemma_processors(idefics3):
    from support.tiny_paligemma import TinyPaliGemmaConfig, build_tiny_paligemma

    images = [_image(size) for size in TWO]
    model, processor = idefics3
    bound = _bind(model, ImageTextProcessor(processor.image_processor, processor.tokenizer), "idefics3")
    encoded = bound.inputs.encode(QUESTION, images)
    rendered = get_template("idefics3").render(QUESTION, image_token=processor.image_token * 2).text
    real = processor(images=[images], text=rendered, return_tensors="pt", add_special_tokens=False)
    assert encoded.input_ids.tolist() == real["input_ids"][0].tolist()
    torch.testing.assert_close(encoded.inputs["pixel_values"], real["pixel_values"], atol=0, rtol=0)
    model, processor = build_tiny_paligemma(TinyPaliGemmaConfig(layers=1))
    encoded = _bind(model, processor, "paligemma").inputs.encode(QUESTION, images)
    real = processor(images=[images], text="<image><image>answer en " + QUESTION, return_tensors="pt")
    assert encoded.input_ids.tolist() == real["input_ids"][0].tolist()
    torch.testing.assert_close(encoded.inputs["pixel_values"], real["pixel_values"], atol=0, rtol=0)


@pytest.mark.parametrize("version", ["2", "3"])
def test_two_image_qwen_prompts_follow_the_processors_rule_per_image(version):
    if version == "3":
        model, processor = build_tiny_qwen3_vl(TinyQwen3VLConfig(layers=1))
    else:
        model, processor = build_tiny_qwen2_vl(TinyQwen2VLConfig(layers=1))
    bound = _bind(model, processor, "qwen3_vl" if version == "3" else "qwen2_vl")
    encoded = bound.inputs.encode(QUESTION, [_image(size) for size in TWO])
    ip = processor.image_processor
    counts = [ip.get_number_of_image_patches(h, w, {}) // ip.merge_size**2 for w, h in TWO]
    expected = "".join("<|vision_start|>" + "<|image_pad|>" * n + "<|vision_end|>" for n in counts)
    assert expected + QUESTION in encoded.text
    assert [b.layout.n_tokens for b in bound.inputs.visual_blocks(encoded)] == counts
