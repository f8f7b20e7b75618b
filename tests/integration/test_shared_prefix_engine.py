"""The fast engine's CPU shared-prefix attention, inside real models, against the reference engine.

With ``sdpa`` on CPU the folded knockouts run through
:mod:`vlmflow.knockout.prefix_attention` (registered with transformers' ``AttentionInterface``, used by the
decoder for the duration of an engine call). Checked on LLaVA and Qwen2-VL (M-RoPE): the path is really taken in every
layer call, its logits equal the reference engine's (a plain full forward with the knockout mask
applied by hooks) for multi-flow and head-level knockouts, and after an error in the middle of a
fold the model's attention implementation and hooks are as before.
"""

from __future__ import annotations

import pytest
import torch
from transformers import AttentionInterface

from vlmflow.experiments.windows import sweep
from vlmflow.knockout import prefix_attention as pa
from vlmflow.knockout.fast import clean_run, fast_logits
from vlmflow.knockout.reference import reference_logits
from vlmflow.knockout.spec import Knockout
from vlmflow.knockout.strategy import SharedPrefixFold
from vlmflow.positions.groups import Flow, Group


@pytest.fixture(scope="module")
def qwen2_vl_prepared(tmp_path_factory):  # (loaded, prepared)
    from conftest import make_scene_sample
    from support.tiny_qwen2_vl import TinyQwen2VLConfig, build_tiny_qwen2_vl
    from vlmflow.experiments.prepare import prepare_sample
    from vlmflow.loading import load_model

    path = tmp_path_factory.mktemp("tiny-qwen2-vl-shared")
    build_tiny_qwen2_vl(TinyQwen2VLConfig(), path)
    loaded = load_model(path, device="cpu", dtype="float32", attn_implementation="sdpa")
    sample, image = make_scene_sample()
    return loaded, prepare_sample(loaded, sample, image)


def _knockouts(loaded, groups) -> list[Knockout]:
    """Windows of two flows (one image->question fold with long suffixes), a two-flow knockout and a head-level one."""
    flows = [Flow.parse("image->question"), Flow.parse("question->last")]
    out = [Knockout.for_flows(groups, [f], layers) for f in flows for _, layers in sweep(3, loaded.n_layers)]
    out.append(Knockout.for_flows(groups, flows, [0, 1]))
    out.append(Knockout.for_flows(groups, [Flow(Group.IMAGE, Group.LAST)], [1], heads=[0]))
    return out


@pytest.fixture
def spy(monkeypatch):  # the (t0, suffix) of every fold that entered the path
    entered: list[tuple[int, int]] = []
    original = SharedPrefixFold.run

    def recording(self, decoder, call):
        entered.extend((s.t0, s.suffix) for s in call.segments)
        return original(self, decoder, call)

    monkeypatch.setattr(SharedPrefixFold, "run", recording)
    return entered


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_shared_prefix_path_is_taken_and_equals_the_reference_engine(tiny_prepared, qwen2_vl_prepared, spy, family):
    loaded, prepared = tiny_prepared("sp-gqa", "sdpa") if family == "llava" else qwen2_vl_prepared
    knockouts = _knockouts(loaded, prepared.groups)
    start = min(k.first_target for k in knockouts)
    clean = clean_run(loaded.decoder, prepared.encoded, capture_from=start)
    got = torch.log_softmax(fast_logits(loaded.decoder, prepared.encoded, clean, knockouts), -1)
    assert spy, "the CPU sdpa fold did not use the shared-prefix attention"
    ref = torch.log_softmax(reference_logits(loaded.decoder, prepared.encoded, knockouts), -1)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=0)
    base = torch.log_softmax(clean.logits, -1)
    assert (ref - base).abs().max() > 1e-3, "the knockouts changed nothing"


def test_registration_config_and_hooks_are_undone_after_an_error(tiny_prepared):
    loaded, prepared = tiny_prepared("sp-gqa", "sdpa")
    decoder, model = loaded.decoder, loaded.model
    config = decoder.attention(0).config
    knockouts = _knockouts(loaded, prepared.groups)
    clean = clean_run(decoder, prepared.encoded, capture_from=min(k.first_target for k in knockouts))
    before = fast_logits(decoder, prepared.encoded, clean, knockouts)
    hooks_before = [len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules()]
    seen = []

    def fail(module, args, kwargs):  # raises inside the fold, after the path was entered
        seen.append(config._attn_implementation)
        raise RuntimeError("layer failed")

    handle = decoder.layers[1].register_forward_pre_hook(fail, with_kwargs=True)
    try:
        with pytest.raises(RuntimeError, match="layer failed"):
            fast_logits(decoder, prepared.encoded, clean, knockouts)
    finally:
        handle.remove()
    assert seen == [pa.ATTENTION_NAME], "the failure did not happen inside the shared-prefix session"
    assert config._attn_implementation == "sdpa"
    # The function stays registered under its own name (transformers has no public unregister);
    # without fold inputs it is plain sdpa, and no model uses it outside a session.
    assert AttentionInterface()[pa.ATTENTION_NAME] is pa.shared_prefix_attention_forward
    assert [len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules()] == hooks_before
    torch.testing.assert_close(fast_logits(decoder, prepared.encoded, clean, knockouts), before, atol=0, rtol=0)
