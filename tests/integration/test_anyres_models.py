"""LLaVA-NeXT and LLaVA-OneVision through the whole path: tiny random checkpoints saved with
``save_pretrained``, loaded with :func:`vlmflow.load_model`, encoded, grouped, knocked out.

* the fast engine equals the reference path (full forward, mask by hooks) for the six paper flows;
* blocked attention is exactly zero, in the window only;
* image-token counts come from the processor, follow the aspect ratio and match the layout;
* groups: image = base + grid + newlines, newlines never "other", related in both views;
* ``nohd_nopad``: one padded view, its features are the model's own base-view features;
* the default prompt follows the checkpoint's tokenizer.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

# The same checks as for LLaVA-1.5, on these families.
from test_knockout_equivalence import _all_knockouts  # tests/integration is on sys.path
from test_knockout_safety import _attention_weights

from support.tiny_next import TinyAnyresConfig, build_tiny_llava_next, build_tiny_llava_onevision
from vlmflow.data.sample import Box, Sample, SceneObject, TaskType
from vlmflow.errors import ConfigError
from vlmflow.experiments.prepare import prepare_sample
from vlmflow.knockout.fast import clean_run, fast_logits
from vlmflow.knockout.reference import reference_logits
from vlmflow.knockout.spec import Knockout
from vlmflow.positions.groups import PAPER_FLOWS, Flow, Group

SHAPES = {
    "next-vicuna": (build_tiny_llava_next, TinyAnyresConfig(tokenizer="sentencepiece")),
    "next-llama3": (
        build_tiny_llava_next,
        TinyAnyresConfig(tokenizer="llama3", layers=3, hidden=48, heads=3, kv_heads=3, seed=1),
    ),
    "onevision": (build_tiny_llava_onevision, TinyAnyresConfig(image_size=36, layers=4, kv_heads=1, seed=2)),
}


@pytest.fixture(scope="module")
def anyres_loaded(tmp_path_factory):
    """``anyres_loaded(shape, impl, image_mode)`` -> LoadedModel (checkpoints built once per module)."""
    from vlmflow.loading import load_model

    paths, cache = {}, {}

    def get(name: str, impl: str = "sdpa", mode: str | None = None):
        if name not in paths:
            builder, config = SHAPES[name]
            paths[name] = tmp_path_factory.mktemp(f"tiny-{name}")
            builder(config, paths[name])
        key = (name, impl, mode)
        if key not in cache:
            options = {"image_mode": mode} if mode else None
            cache[key] = load_model(paths[name], device="cpu", dtype="float32", attn_implementation=impl, options=options)
        return cache[key]

    return get


def scene(size=(60, 36), box=None):
    """A scene image with one boxed red square."""
    box = box or Box(8, 6, 14, 12)
    image = Image.new("RGB", size, (30, 120, 30))
    ImageDraw.Draw(image).rectangle((box.x, box.y, box.x + box.w - 1, box.y + box.h - 1), fill=(220, 20, 20))
    sample = Sample(
        sample_id=f"s{size[0]}x{size[1]}",
        image_id="img",
        question="Is the square red or blue?",
        answer="red",
        task=TaskType.CHOOSE_ATTR,
        true_option="red",
        false_option="blue",
        objects=(SceneObject("square", "1", box),),
        image_size=size,
    )
    return sample, image


# Both attention kernels per family; the Llama-3 shape (long system prompt) is the slowest, so sdpa only.
CASES = [
    ("next-vicuna", "sdpa", None, 1),
    ("next-vicuna", "eager", None, 3),
    ("next-vicuna", "sdpa", "nohd_nopad", 3),
    ("next-vicuna", "eager", "nohd_nopad", 1),
    ("next-llama3", "sdpa", None, 3),
    ("onevision", "sdpa", None, 1),
    ("onevision", "eager", None, 3),
]


@pytest.mark.parametrize("shape, impl, mode, window", CASES)
def test_fast_equals_reference_for_the_six_flows(anyres_loaded, shape, impl, mode, window):
    loaded = anyres_loaded(shape, impl, mode)
    prepared = prepare_sample(loaded, *scene())
    pairs = _all_knockouts(loaded, prepared.groups, window)
    knockouts = [k for _, k in pairs]
    start = min(k.first_target for k in knockouts)
    clean = clean_run(loaded.decoder, prepared.encoded, capture_from=start, max_new_tokens=2,
                      eos_token_id=loaded.tokenizer.eos_token_id)
    fast = torch.log_softmax(fast_logits(loaded.decoder, prepared.encoded, clean, knockouts), -1)
    ref = torch.log_softmax(reference_logits(loaded.decoder, prepared.encoded, knockouts), -1)
    torch.testing.assert_close(fast, ref, atol=1e-5, rtol=0)
    base = torch.log_softmax(clean.logits, -1)
    for flow in PAPER_FLOWS:
        rows = [i for i, (f, _) in enumerate(pairs) if f == flow]
        assert (ref[rows] - base).abs().max() > 1e-3, f"{flow} changed nothing"


@pytest.mark.parametrize("shape", ["next-vicuna", "onevision"])
@pytest.mark.parametrize("flow", ["image->question", "related->question", "other->question", "image_newline->last"])
def test_blocked_attention_weights_are_exactly_zero(anyres_loaded, shape, flow):
    loaded = anyres_loaded(shape, "eager")
    prepared = prepare_sample(loaded, *scene())
    flow = Flow.parse(flow)
    knockout = Knockout.for_flows(prepared.groups, [flow], [1, 2])
    weights = _attention_weights(loaded, prepared, knockout)
    targets, sources = list(prepared.groups[flow.target]), list(prepared.groups[flow.source])
    for layer, w in weights.items():
        block = w[:, targets][:, :, sources]
        if layer in (1, 2):
            assert torch.count_nonzero(block) == 0, f"layer {layer} still attends along {flow}"
        else:
            assert torch.count_nonzero(block) > 0
        torch.testing.assert_close(w.sum(-1), torch.ones_like(w.sum(-1)), atol=1e-5, rtol=0)


@pytest.mark.parametrize("shape", ["next-vicuna", "onevision"])
def test_image_tokens_follow_the_aspect_ratio_and_the_layout(anyres_loaded, shape):
    loaded = anyres_loaded(shape)
    image_id = loaded.inputs.image_token_id
    counts = {}
    for size in ((60, 36), (36, 60), (80, 20), (17, 17), (100, 75)):
        sample, image = scene(size, Box(size[0] // 4, size[1] // 4, size[0] // 3, size[1] // 3))
        prepared = prepare_sample(loaded, sample, image)
        g = prepared.groups
        n_image = int((prepared.encoded.input_ids == image_id).sum())
        counts[size] = n_image
        layout = loaded.inputs.image_layout(prepared.encoded)
        assert layout.n_tokens == n_image == len(g[Group.IMAGE])
        image, base, grid = set(g[Group.IMAGE]), set(g[Group.IMAGE_BASE]), set(g[Group.IMAGE_GRID])
        newline = set(g[Group.IMAGE_NEWLINE])
        assert base | grid | newline == image and not (base & grid) and not (grid & newline)
        assert min(grid | newline) > max(base)  # base view first
        assert max(image) in newline  # the grid ends with a newline
        related, other = set(g[Group.RELATED]), set(g[Group.OTHER])
        assert related & base and related & grid  # the box shows in both views
        assert related | other == base | grid and not (other & newline) and not (related & other)
        assert Group.PADDING not in g  # un-padding leaves no pure-fill patch
    assert len(set(counts.values())) >= 4, counts  # the count follows the aspect ratio


def test_onevision_downscales_large_grids(anyres_loaded):
    """The tiny OneVision is anyres_max_1: a two-view grid holds too many tokens and is shrunk."""
    loaded = anyres_loaded("onevision")
    prepared = prepare_sample(loaded, *scene((70, 36)))
    layout = loaded.inputs.image_layout(prepared.encoded)
    assert layout.geometry.grid.downscaled
    side = loaded.model.config.vision_config.image_size // loaded.model.config.vision_config.patch_size
    rows, cols = layout.geometry.grid.shape
    assert layout.n_tokens == side * side + rows * (cols + 1)


def test_nohd_nopad_is_one_padded_view_with_the_models_own_features(anyres_loaded):
    loaded = anyres_loaded("next-vicuna", "sdpa", "nohd_nopad")
    model, processor = loaded.model, loaded.processor
    sample, image = scene((64, 20))
    prepared = prepare_sample(loaded, sample, image)
    vision = model.config.vision_config
    n = (vision.image_size // vision.patch_size) ** 2
    g = prepared.groups
    assert len(g[Group.IMAGE]) == n == len(g[Group.IMAGE_BASE])
    assert Group.IMAGE_GRID not in g and Group.IMAGE_NEWLINE not in g
    assert g[Group.PADDING]  # the mean-colour padding of a 64x20 image fills whole patch rows
    assert set(g[Group.PADDING]) <= set(g[Group.OTHER])  # as in LLaVA-1.5: padding counts as "other"

    # Features: CLIP on the padded square resized to one view, CLS dropped, projected.
    from vlmflow.adapters.llava import expand_to_square

    ip = processor.image_processor
    square = expand_to_square(image, tuple(int(255 * m) for m in ip.image_mean)).resize(
        (vision.image_size, vision.image_size), Image.Resampling.BICUBIC
    )
    clip = processor.image_processor(images=square, return_tensors="pt")["pixel_values"][:, 0]
    with torch.no_grad():
        hidden = model.model.vision_tower(clip, output_hidden_states=True).hidden_states[model.config.vision_feature_layer]
        expected = model.model.multi_modal_projector(hidden[:, 1:])[0]
    features = prepared.encoded.inputs["mm_encoder_outputs"]["image"].pooler_output[0]
    torch.testing.assert_close(features, expected, atol=1e-5, rtol=0)

    # The model uses them at the image positions: same logits as a forward on merged embeddings.
    ids = prepared.encoded.inputs["input_ids"]
    embeds = model.get_input_embeddings()(ids).clone()
    embeds[0, list(g[Group.IMAGE])] = expected
    with torch.no_grad():
        ours = model(**prepared.encoded.inputs).logits[0, -1]
        merged = model(inputs_embeds=embeds).logits[0, -1]
    torch.testing.assert_close(ours, merged, atol=1e-5, rtol=0)


def test_default_prompt_follows_the_tokenizer(anyres_loaded):
    assert anyres_loaded("next-vicuna").template.name == "vicuna_v1"
    assert anyres_loaded("next-llama3").template.name == "llava_llama_3"
    assert anyres_loaded("onevision").template.name == "qwen_1_5"


def test_llama3_prompt_tokens_through_the_processor(anyres_loaded):
    """The ids the model sees are the llava_llama_3 definition's, with the placeholder expanded."""
    from vlmflow.prompts import ANSWER_SUFFIX, LLAMA3_SYSTEM

    loaded = anyres_loaded("next-llama3")
    sample, image = scene()
    prepared = prepare_sample(loaded, sample, image)
    tok = loaded.tokenizer
    messages = [
        {"role": "system", "content": LLAMA3_SYSTEM},
        {"role": "user", "content": "<image>\n" + sample.question + ANSWER_SUFFIX},
    ]
    definition = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) + " \n"
    before, after = definition.split("<image>")
    ids = prepared.encoded.input_ids.tolist()
    image_id = loaded.inputs.image_token_id
    first = ids.index(image_id)
    n_image = ids.count(image_id)
    assert ids[:first] == tok(before, add_special_tokens=False)["input_ids"]
    assert ids[first + n_image :] == tok(after, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids[slice(*_span(prepared.groups[Group.QUESTION]))]).strip() == sample.question


def _span(positions):
    return positions[0], positions[-1] + 1


def test_inconsistent_settings_are_refused(anyres_loaded):
    import copy

    loaded = anyres_loaded("next-vicuna")
    sample, image = scene()
    prepared = prepare_sample(loaded, sample, image)
    other = copy.deepcopy(loaded.processor)
    other.image_processor.image_grid_pinpoints = [[32, 32]]
    # Binding checks the processor against the model and the options, before any sample.
    with pytest.raises(ConfigError, match="image_grid_pinpoints"):
        loaded.family.bind(loaded.model, other, loaded.template, loaded.options)
    with pytest.raises(ConfigError, match="nohd_nopad"):
        loaded.family.bind(loaded.model, loaded.processor, loaded.template, {"image_mode": "pad"})
    ov = anyres_loaded("onevision")
    with pytest.raises(ConfigError, match="valid: anyres"):
        ov.family.bind(ov.model, ov.processor, ov.template, {"image_mode": "nohd_nopad"})
    assert prepare_sample(loaded, sample, image).encoded.seq_len == prepared.encoded.seq_len


def test_onevision_processor_loads_without_torchvision(anyres_loaded):
    from transformers.utils import is_torchvision_available

    loaded = anyres_loaded("onevision")
    expected = "LlavaOnevisionProcessor" if is_torchvision_available() else "OnevisionImageProcessor"
    assert type(loaded.processor).__name__ == expected
    assert np.asarray(loaded.processor.image_processor.image_grid_pinpoints).shape == (9, 2)
