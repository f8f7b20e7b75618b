"""The start-up self-test: it passes on working models through every engine and kernel, and it
refuses to start when a knockout would silently do nothing."""

from __future__ import annotations

import json
from unittest import mock

import pytest
import torch
from transformers.modeling_utils import AttentionInterface

import vlmflow.knockout.fast as fast_module
import vlmflow.knockout.reference as reference_module
from conftest import make_scene_sample
from vlmflow.data.csvio import write_task_csv
from vlmflow.experiments.flows import FlowSettings
from vlmflow.experiments.runner import DataSpec, RunSpec, run_to_store
from vlmflow.experiments.selftest import SelfTestError, run_self_test
from vlmflow.knockout.strategy import DenseFold, SharedPrefixFold, choose_strategy
from vlmflow.load_spec import LoadSpec
from vlmflow.positions.groups import Flow, Group


@pytest.mark.parametrize(
    ("shape", "impl", "engine"),
    [("sp-gqa", "sdpa", "fast"), ("sp-gqa", "eager", "reference"), ("bpe-mha", "eager", "fast"), ("word-mqa", "sdpa", "reference")],
)
def test_self_test_passes_on_a_working_model(tiny_loaded, shape, impl, engine):
    report = run_self_test(tiny_loaded(shape, impl), engine)
    assert report.engine == engine and report.attn_implementation == impl
    assert report.clean_image_effect > 0.1  # the image matters in the clean model ...
    assert report.knockout_image_effect == 0.0  # ... and not at all once every text position is blocked from it
    assert report.knockout_effect > 0.1
    assert report.no_op_error < 1e-4
    assert report.blocked_probability == 0.0
    assert report.clean_probability > 0.0


def _mask_ignoring_sdpa(original):
    """An sdpa kernel that drops the explicit mask and runs plain causal attention, as flash-attention
    kernels do: the knockout never reaches it."""

    def forward(module, query, key, value, attention_mask, *args, **kwargs):
        kwargs["is_causal"] = True
        return original(module, query, key, value, None, *args, **kwargs)

    return forward


@pytest.mark.parametrize("engine", ["fast", "reference"])
def test_self_test_refuses_a_kernel_that_ignores_the_mask(tiny_loaded, engine):
    loaded = tiny_loaded("sp-gqa", "sdpa")
    original = AttentionInterface._global_mapping["sdpa"]
    # The fast engine's folds go through the model's kernel (dense mask), as they do on CUDA.
    dense = mock.patch.object(fast_module, "choose_strategy", lambda decoder: DenseFold())
    with dense, mock.patch.dict(AttentionInterface._global_mapping, {"sdpa": _mask_ignoring_sdpa(original)}):
        # The reference path's knockout does nothing, so the output follows the image; the fast path's
        # folded queries (prefix keys + own suffix) get a mask-less causal pattern, so the knocked-out
        # output still moves with the image too. (The no-op knockout never reaches the kernel on a
        # causal model: edges that do not exist are recognised and skipped.)
        expected = {
            "reference": "output still depends on the image .* the knockout mask does not reach the attention kernel",
            "fast": "output still depends on the image .* the knockout mask does not reach the attention kernel",
        }
        with pytest.raises(SelfTestError, match=expected[engine]):
            run_self_test(loaded, engine)
    assert run_self_test(loaded, engine).knockout_image_effect == 0.0  # restored: passes again


def test_fast_engine_on_cpu_does_not_depend_on_the_models_kernel_for_the_mask(tiny_loaded):
    """On CPU with sdpa the folded knockouts run through vlmflow's shared-prefix attention, so a model
    kernel that drops masks (it still computes the clean causal pass right) cannot undo a knockout."""
    loaded = tiny_loaded("sp-gqa", "sdpa")
    assert isinstance(choose_strategy(loaded.decoder), SharedPrefixFold)
    original = AttentionInterface._global_mapping["sdpa"]
    with mock.patch.dict(AttentionInterface._global_mapping, {"sdpa": _mask_ignoring_sdpa(original)}):
        report = run_self_test(loaded, "fast")
    assert report.knockout_image_effect == 0.0 and report.knockout_effect > 0.1 and report.no_op_error < 1e-4


def test_self_test_refuses_blocked_attention_that_is_not_zero(tiny_loaded):
    """The peer tools' bug: a bool mask added to the eager scores as 0/1 blocks nothing."""
    loaded = tiny_loaded("sp-gqa", "sdpa")
    real = reference_module.to_kernel_mask

    def additive_bool(allowed, implementation, dtype):
        return allowed.to(dtype) if implementation == "eager" else real(allowed, implementation, dtype)

    with mock.patch.object(reference_module, "to_kernel_mask", additive_bool), pytest.raises(SelfTestError, match="blocked attention is not zero"):
        run_self_test(loaded, "fast")


def test_self_test_refuses_a_model_the_image_does_not_reach(tiny_loaded):
    loaded = tiny_loaded("word-mqa", "sdpa")
    projector = loaded.model.model.multi_modal_projector
    handle = projector.register_forward_hook(lambda module, args, out: torch.zeros_like(out))
    try:
        with pytest.raises(SelfTestError, match="inconclusive .* two different images give the same clean logits"):
            run_self_test(loaded, "fast")
    finally:
        handle.remove()


def test_a_run_stops_before_any_work_when_the_self_test_fails_and_records_it_when_it_passes(tiny_loaded, tmp_path):
    loaded = tiny_loaded("sp-gqa", "sdpa")
    sample, image = make_scene_sample()
    image.save(tmp_path / "img1.png")
    write_task_csv([sample], tmp_path / "ChooseAttr.csv")
    settings = FlowSettings(flows=(Flow(Group.IMAGE, Group.LAST),), keep_all=True, max_new_tokens=1)
    spec = RunSpec(LoadSpec("x"), DataSpec(str(tmp_path / "ChooseAttr.csv")), settings, name="run")
    original = AttentionInterface._global_mapping["sdpa"]
    patched = {"sdpa": _mask_ignoring_sdpa(original)}
    dense = mock.patch.object(fast_module, "choose_strategy", lambda decoder: DenseFold())  # as on CUDA
    with dense, mock.patch.dict(AttentionInterface._global_mapping, patched), pytest.raises(SelfTestError):
        run_to_store(spec, tmp_path / "runs", loaded=loaded)
    assert not (tmp_path / "runs").exists()
    outcome = run_to_store(spec, tmp_path / "runs", loaded=loaded)
    recorded = json.loads((outcome.path / "spec.json").read_text())["provenance"]["self_test"]
    assert recorded["engine"] == "fast" and recorded["knockout_image_effect"] == 0.0
    assert recorded["blocked_probability"] == 0.0 and recorded["clean_image_effect"] > 0
