"""Qwen2-VL, Qwen2.5-VL, Qwen3-VL (dense, MoE), Gemma-3, PaliGemma, Idefics3, SmolVLM and InternVL: the engine
on tiny random checkpoints.

Each family's tiny model is built from a config, saved with ``save_pretrained`` and loaded back
through :func:`vlmflow.loading.load_model`. Checked per family and attention implementation: the
fast engine equals the reference path (one hooked full forward per knockout) for all six paper
flows in every single-layer window, every flow changes the output somewhere, the clean run equals
a plain forward, blocked attention is exactly zero, and an empty knockout changes nothing (which
also checks that the adapter's clean attention pattern is the model's own mask in every layer).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from support.tiny_families import BUILDERS, FAMILY_OF
from vlmflow.experiments.prepare import prepare_sample
from vlmflow.experiments.windows import sweep
from vlmflow.knockout.executor import run_fold
from vlmflow.knockout.fast import affected_starts, clean_run, fast_logits
from vlmflow.knockout.plan import plan_fold
from vlmflow.knockout.reference import attention_knockout, clean_logits, reference_logits
from vlmflow.knockout.spec import Knockout
from vlmflow.knockout.strategy import choose_strategy
from vlmflow.loading import load_model
from vlmflow.positions.groups import PAPER_FLOWS, Flow, Group

# SmolVLM and Qwen2.5-VL share their language side with Idefics3 and Qwen2-VL: one kernel each.
CASES = [
    ("qwen2_vl", "sdpa"),
    ("qwen2_vl", "eager"),
    ("qwen2_5_vl", "sdpa"),
    ("qwen3_vl", "sdpa"),
    ("qwen3_vl", "eager"),
    ("qwen3_vl_moe", "sdpa"),
    ("qwen3_vl_moe", "eager"),
    ("gemma3", "sdpa"),
    ("gemma3", "eager"),
    ("paligemma", "sdpa"),
    ("paligemma", "eager"),
    ("idefics3", "sdpa"),
    ("idefics3", "eager"),
    ("smolvlm", "eager"),
    ("internvl", "sdpa"),
    ("internvl", "eager"),
    ("internvl_qwen3", "sdpa"),
]


@pytest.fixture(scope="session")
def family_prepared(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str, str], tuple]:
    """``family_prepared(family, impl)`` -> ``(loaded, prepared)`` for the scene sample (cached)."""
    from conftest import make_scene_sample

    paths: dict[str, Path] = {}
    cache: dict[tuple[str, str], tuple] = {}

    def get(family: str, impl: str) -> tuple:
        if family not in paths:
            paths[family] = tmp_path_factory.mktemp(f"tiny-{family}")
            BUILDERS[family](paths[family])
        if (family, impl) not in cache:
            loaded = load_model(paths[family], device="cpu", dtype="float32", attn_implementation=impl)
            sample, image = make_scene_sample()
            cache[(family, impl)] = (loaded, prepare_sample(loaded, sample, image))
        return cache[(family, impl)]

    return get


def _log_softmax(x: torch.Tensor) -> torch.Tensor:
    return torch.log_softmax(x, dim=-1)


@pytest.mark.parametrize(("family", "impl"), CASES)
def test_fast_equals_reference_for_the_six_flows(family_prepared, family, impl):
    loaded, prepared = family_prepared(family, impl)
    assert loaded.family.family == FAMILY_OF.get(family, family)
    windows = sweep(1, loaded.n_layers)
    pairs = [(flow, Knockout.for_flows(prepared.groups, [flow], layers)) for flow in PAPER_FLOWS for _, layers in windows]
    knockouts = [k for _, k in pairs]
    start = min(affected_starts(loaded.decoder.attention_pattern(prepared.encoded), loaded.n_layers, prepared.encoded.seq_len, knockouts))
    clean = clean_run(loaded.decoder, prepared.encoded, capture_from=start, max_new_tokens=2,
                      eos_token_id=loaded.tokenizer.eos_token_id)
    torch.testing.assert_close(clean.logits, clean_logits(loaded.decoder, prepared.encoded), atol=1e-6, rtol=0)
    fast = _log_softmax(fast_logits(loaded.decoder, prepared.encoded, clean, knockouts))
    ref = _log_softmax(reference_logits(loaded.decoder, prepared.encoded, knockouts))
    torch.testing.assert_close(fast, ref, atol=1e-5, rtol=0)
    base = _log_softmax(clean.logits)
    for flow in PAPER_FLOWS:
        rows = [i for i, (f, _) in enumerate(pairs) if f == flow]
        assert (ref[rows] - base).abs().max() > 1e-3, f"{flow} changed nothing"


@pytest.mark.parametrize("family", sorted(BUILDERS))
def test_empty_knockout_changes_nothing_so_the_clean_pattern_is_the_models_mask(family_prepared, family):
    loaded, prepared = family_prepared(family, "eager")
    g = prepared.groups
    base = clean_logits(loaded.decoder, prepared.encoded)
    # Hooks in every layer replace the model's own mask with the adapter's clean pattern.
    empty = Knockout(edges=((g[Group.LAST], ()),), layers=tuple(range(loaded.n_layers)))
    backwards = Knockout.for_flows(g, [Flow(Group.LAST, Group.QUESTION)], range(loaded.n_layers))
    ref = reference_logits(loaded.decoder, prepared.encoded, [empty, backwards])
    torch.testing.assert_close(ref[0], base, atol=1e-5, rtol=0)
    # The question reads the last position only in a prefix-LM; elsewhere that knockout is a no-op.
    rows = torch.as_tensor(g[Group.QUESTION])
    reads_last = bool(loaded.decoder.attention_pattern(prepared.encoded).allowed(0, rows, prepared.encoded.seq_len)[:, -1].any())
    assert reads_last == (family == "paligemma")
    if reads_last:
        assert (ref[1] - base).abs().max() > 1e-3
    else:
        torch.testing.assert_close(ref[1], base, atol=1e-5, rtol=0)


def _attention_weights(loaded, prepared, knockout):
    weights, handles = {}, []
    for layer in range(loaded.n_layers):
        module = loaded.decoder.attention(layer)

        def keep(mod, args, kwargs, out, layer=layer):
            weights[layer] = out[1][0].detach()

        handles.append(module.register_forward_hook(keep, with_kwargs=True))
    try:
        with attention_knockout(loaded.decoder, prepared.encoded, knockout):
            loaded.model(**prepared.encoded.inputs)
    finally:
        for handle in handles:
            handle.remove()
    return weights


@pytest.mark.parametrize("family", sorted(BUILDERS))
@pytest.mark.parametrize("flow", ["image->question", "related->question", "question->last"])
def test_blocked_attention_weights_are_exactly_zero(family_prepared, family, flow):
    loaded, prepared = family_prepared(family, "eager")
    flow = Flow.parse(flow)
    knockout = Knockout.for_flows(prepared.groups, [flow], [1, 2])
    weights = _attention_weights(loaded, prepared, knockout)
    targets, sources = list(prepared.groups[flow.target]), list(prepared.groups[flow.source])
    for layer, w in weights.items():
        block = w[:, targets][:, :, sources]
        if layer in (1, 2):
            assert torch.count_nonzero(block) == 0, f"layer {layer} still attends along {flow}"
        else:
            assert torch.count_nonzero(block) > 0  # outside the window the edges are used
        torch.testing.assert_close(w.sum(-1), torch.ones_like(w.sum(-1)), atol=1e-5, rtol=0)


def test_paligemma_prefix_lm_recomputes_the_whole_prompt(family_prepared):
    """Every prompt position reads every other one, so any knockout not in the last layer can change
    position 0; the start is 0 and the result still equals the reference."""
    loaded, prepared = family_prepared("paligemma", "sdpa")
    g = prepared.groups
    knockouts = [Knockout.for_flows(g, [Flow(Group.QUESTION, Group.LAST)], [layer]) for layer in range(loaded.n_layers)]
    starts = affected_starts(loaded.decoder.attention_pattern(prepared.encoded), loaded.n_layers, prepared.encoded.seq_len, knockouts)
    assert starts == [0] * (loaded.n_layers - 1) + [g[Group.LAST][0]]
    assert bool(loaded.decoder.attention_pattern(prepared.encoded).allowed(0, torch.tensor([0]), prepared.encoded.seq_len).all())


# ---- Gemma-3: knockouts whose targets are inside the bidirectional image block ------------------
IMAGE_TARGET_FLOWS = [Flow(Group.OTHER, Group.RELATED), Flow(Group.RELATED, Group.OTHER), Flow(Group.QUESTION, Group.LAST)]


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_gemma3_image_targets_are_exact_because_the_start_moves_to_the_image(family_prepared, impl):
    loaded, prepared = family_prepared("gemma3", impl)
    g = prepared.groups
    knockouts = [Knockout.for_flows(g, [f], layers) for f in IMAGE_TARGET_FLOWS for _, layers in sweep(1, loaded.n_layers)]
    starts = affected_starts(loaded.decoder.attention_pattern(prepared.encoded), loaded.n_layers, prepared.encoded.seq_len, knockouts)
    first_image = g[Group.IMAGE][0]
    # Image targets in any layer but the last spread back through the image block; the last
    # position is read by nobody.
    assert starts[0] == starts[4] == first_image and starts[-1] == g[Group.LAST][0]
    clean = clean_run(loaded.decoder, prepared.encoded, capture_from=min(starts))
    fast = _log_softmax(fast_logits(loaded.decoder, prepared.encoded, clean, knockouts))
    ref = _log_softmax(reference_logits(loaded.decoder, prepared.encoded, knockouts))
    torch.testing.assert_close(fast, ref, atol=1e-5, rtol=0)
    # The causal rule (recompute from the first target only) would be wrong here.
    decoder, encoded = loaded.decoder, prepared.encoded
    plan = plan_fold(
        [knockouts[0]], decoder.attention_pattern(encoded), t0=knockouts[0].first_target, n=encoded.seq_len,
        n_layers=decoder.n_layers,
    )
    strategy = choose_strategy(decoder)
    with strategy.session(decoder):
        naive = decoder.unembed(decoder.final_norm(run_fold(plan, decoder, encoded, clean, strategy))).float()
    assert (_log_softmax(naive)[0] - ref[0]).abs().max() > 1e-4


def test_gemma3_clean_pattern_matches_the_mask_transformers_builds(family_prepared):
    """Per layer, the adapter's pattern equals the (eager, additive) mask the model passes: sliding
    windows in sliding layers, the bidirectional image block everywhere."""
    loaded, prepared = family_prepared("gemma3", "eager")
    seen: dict[int, torch.Tensor] = {}
    handles = []
    for layer in range(loaded.n_layers):
        def grab(module, args, kwargs, layer=layer):
            seen[layer] = kwargs["attention_mask"][0, 0] == 0  # additive float mask -> allowed
        handles.append(loaded.decoder.attention(layer).register_forward_pre_hook(grab, with_kwargs=True))
    try:
        loaded.model(**prepared.encoded.inputs)
    finally:
        for handle in handles:
            handle.remove()
    n = prepared.encoded.seq_len
    rows = torch.arange(n)
    for layer, allowed in seen.items():
        expected = loaded.decoder.attention_pattern(prepared.encoded).allowed(layer, rows, n)
        assert torch.equal(allowed, expected), f"layer {layer}"
    window = loaded.model.config.text_config.sliding_window
    assert n > window  # the tiny prompt really has keys outside the window
    image = list(prepared.groups[Group.IMAGE])
    assert bool(seen[0][image[0], image[-1]])  # the first image token sees the last one


# ---- Qwen3-VL: DeepStack adds vision features to the image rows after the first layers -----------
@pytest.mark.parametrize(("family", "impl"), [("qwen3_vl", "sdpa"), ("qwen3_vl", "eager"), ("qwen3_vl_moe", "sdpa")])
def test_qwen3_vl_image_targets_are_exact_because_deepstack_is_added_to_recomputed_rows(family_prepared, family, impl):
    from dataclasses import replace

    loaded, prepared = family_prepared(family, impl)
    decoder, encoded, g = loaded.decoder, prepared.encoded, prepared.groups
    knockouts = [Knockout.for_flows(g, [f], layers) for f in IMAGE_TARGET_FLOWS for _, layers in sweep(1, loaded.n_layers)]
    clean = clean_run(decoder, encoded, capture_from=g[Group.IMAGE][0])
    # The recorded additions sit at the image tokens, one set per DeepStack layer (0 and 1 of 4 here).
    assert clean.additions is not None
    assert tuple(clean.additions.positions.tolist()) == g[Group.IMAGE]
    assert sorted(clean.additions.values) == list(range(len(loaded.model.config.vision_config.deepstack_visual_indexes)))
    fast = _log_softmax(fast_logits(decoder, encoded, clean, knockouts))
    ref = _log_softmax(reference_logits(decoder, encoded, knockouts))
    torch.testing.assert_close(fast, ref, atol=1e-5, rtol=0)
    assert (ref - _log_softmax(clean.logits)).abs().max() > 1e-3, "the knockouts changed nothing"
    # Recomputing the image rows without DeepStack would be wrong: the additions are what makes it exact.
    naive = _log_softmax(fast_logits(decoder, encoded, replace(clean, additions=None), knockouts))
    assert (naive - ref).abs().max() > 1e-3


@pytest.mark.parametrize("family", ["gemma3", "paligemma", "qwen2_vl", "qwen3_vl"])
def test_flow_experiment_fast_and_reference_engines_agree(family_prepared, family):
    """The runner's per-sample analysis (clean run kept from the first affected position) end to end."""
    from vlmflow.experiments.flows import FlowSettings, analyse_sample

    loaded, prepared = family_prepared(family, "sdpa")
    rows = {}
    for engine in ("fast", "reference"):
        settings = FlowSettings(window=2, keep_all=True, engine=engine, max_new_tokens=1)
        result = analyse_sample(loaded, prepared, settings)
        rows[engine] = [(r.flow, r.layer, r.p_blocked) for r in result.rows]
    assert len(rows["fast"]) == 6 * loaded.n_layers
    for (flow, layer, p_fast), (_, _, p_ref) in zip(rows["fast"], rows["reference"], strict=True):
        assert abs(p_fast - p_ref) < 1e-5, (flow, layer)


@pytest.fixture
def fold_savings(monkeypatch):  # counts of branched variants and of last-row-only top layers
    from vlmflow.adapters.decoder import DecoderMap
    from vlmflow.knockout import plan as fold_plan

    taken = {"branched": 0, "top": 0}
    plan, key_values = fold_plan.branch_plan, DecoderMap.layer_key_values

    def counting_plan(variants):
        out = plan(variants)
        taken["branched"] += sum(parent is not None for parent in out[2])
        return out

    def counting_key_values(self, *args, **kwargs):
        taken["top"] += 1
        return key_values(self, *args, **kwargs)

    monkeypatch.setattr(fold_plan, "branch_plan", counting_plan)
    monkeypatch.setattr(DecoderMap, "layer_key_values", counting_key_values)
    return taken


@pytest.mark.parametrize(("family", "impl"), CASES)
def test_branched_windows_and_last_row_top_layers_equal_the_reference(family_prepared, fold_savings, family, impl):
    """Window 3: the windows clipped at layer 0 branch off each other, and folds with several rows
    compute only the last row in the top layer; the logits stay the reference's."""
    loaded, prepared = family_prepared(family, impl)
    knockouts = [Knockout.for_flows(prepared.groups, [flow], layers) for flow in PAPER_FLOWS for _, layers in sweep(3, loaded.n_layers)]
    start = min(affected_starts(loaded.decoder.attention_pattern(prepared.encoded), loaded.n_layers, prepared.encoded.seq_len, knockouts))
    clean = clean_run(loaded.decoder, prepared.encoded, capture_from=start)
    fast = _log_softmax(fast_logits(loaded.decoder, prepared.encoded, clean, knockouts))
    assert fold_savings["branched"] > 0 and fold_savings["top"] > 0, fold_savings
    ref = _log_softmax(reference_logits(loaded.decoder, prepared.encoded, knockouts))
    torch.testing.assert_close(fast, ref, atol=1e-5, rtol=0)
    assert (ref - _log_softmax(clean.logits)).abs().max() > 1e-3, "the knockouts changed nothing"


@pytest.mark.parametrize("family", sorted(BUILDERS))
def test_layer_key_values_are_the_keys_and_values_the_model_caches(family_prepared, family):
    loaded, prepared = family_prepared(family, "eager")
    decoder, encoded = loaded.decoder, prepared.encoded
    clean = clean_run(decoder, encoded, capture_from=0)
    positions = decoder.position_ids(encoded)
    for layer in (0, loaded.n_layers - 1):
        x = clean.hidden[layer][None]  # [1, n, d_model]: the clean inputs of the layer
        pe = decoder.rotary(x, positions)
        keys, values = decoder.layer_key_values(layer, x, positions, pe)
        torch.testing.assert_close(keys, clean.keys[layer], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(values, clean.values[layer], atol=1e-5, rtol=1e-5)


# Not the tiny Gemma-3: its sliding window (a few tokens) hides the image from the later text rows,
# which the self-test rightly calls inconclusive (the released window of 1024 does not).
@pytest.mark.parametrize("family", sorted(set(BUILDERS) - {"gemma3"}))
def test_start_up_self_test_passes(family_prepared, family):
    from vlmflow.experiments.selftest import run_self_test

    loaded, _ = family_prepared(family, "sdpa")
    report = run_self_test(loaded, "fast")
    assert report.blocked_probability == 0.0 and report.knockout_image_effect <= 0.01 * report.clean_image_effect
