"""The accelerator fold path inside real models: exact against the reference engine, batched across
samples, and with no read back to the host inside the layer loop.

On CPU the accelerator strategy runs the same code as on a GPU (explicit products, float32 scores
and softmax, host facts computed before the loop), so its results are checked here against the
reference engine (a plain full forward with the knockout mask applied by hooks) on LLaVA, Qwen2-VL
(M-RoPE) and Gemma-3 (bidirectional image blocks, sliding layers). That the layer loop reads
nothing back from the device is checked on CPU by refusing, inside the loop, every torch call that
would read a tensor's value on the host (``bool``, ``item``, ``tolist``, ``nonzero``, ``cpu``, a
tensor made from host data, ...); on CUDA, by torch's synchronisation debug mode (``-m gpu``).
"""

from __future__ import annotations

import pytest
import torch
from test_batched_samples import mixed_samples
from test_families_more import BUILDERS
from torch.overrides import TorchFunctionMode

from vlmflow.experiments.prepare import prepare_sample
from vlmflow.experiments.windows import sweep
from vlmflow.knockout.executor import FoldJob, finish_folds, fold_layers, prepare_folds
from vlmflow.knockout.fast import FoldRequest, affected_starts, clean_run, fast_logits, fast_logits_batch
from vlmflow.knockout.plan import plan_fold
from vlmflow.knockout.reference import reference_logits
from vlmflow.knockout.spec import Knockout
from vlmflow.knockout.strategy import AcceleratorFold
from vlmflow.loading import load_model
from vlmflow.positions.groups import PAPER_FLOWS, Flow, Group

#: Torch calls that read a tensor's value on the host (a host-device synchronisation on an accelerator).
HOST_READS = {
    "__bool__", "__int__", "__float__", "__index__", "item", "tolist", "numpy", "nonzero", "cpu",
    "tensor", "as_tensor", "from_numpy", "equal", "allclose", "is_nonzero", "any_", "unique",
}  # fmt: skip


class RefuseHostReads(TorchFunctionMode):
    """Raise on any torch call that reads a tensor's value back to the host."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", str(func))
        if name in HOST_READS:
            raise AssertionError(f"the layer loop read a value back to the host: {name}")
        return func(*args, **(kwargs or {}))


@pytest.fixture(scope="module")
def loaded_family(tmp_path_factory, tiny_checkpoint):
    cache = {}

    def get(family: str, dtype: str = "float32", device: str = "cpu"):
        key = (family, dtype, device)
        if key not in cache:
            if family == "llava":
                path = tiny_checkpoint("sp-gqa")
            else:
                path = tmp_path_factory.mktemp(f"acc-{family}")
                BUILDERS[family](path)
            cache[key] = load_model(path, device=device, dtype=dtype, attn_implementation="sdpa")
        return cache[key]

    return get


def _knockouts(loaded, groups) -> list[Knockout]:
    """Every paper flow in windows of 3, a two-flow knockout and a head-level one."""
    out = [Knockout.for_flows(groups, [f], layers) for f in PAPER_FLOWS for _, layers in sweep(3, loaded.n_layers)]
    out.append(Knockout.for_flows(groups, [Flow.parse("image->question"), Flow.parse("question->last")], [0, 1]))
    out.append(Knockout.for_flows(groups, [Flow(Group.IMAGE, Group.LAST)], [1], heads=[0]))
    return out


def _setup(loaded, tmp_path, n=3):
    _, samples = mixed_samples(tmp_path / "data", n=n)
    prepared = [prepare_sample(loaded, s, image, check_answer=False) for s, image in samples]
    out = []
    for p in prepared:
        knockouts = _knockouts(loaded, p.groups)
        pattern = loaded.decoder.attention_pattern(p.encoded)
        start = min(affected_starts(pattern, loaded.n_layers, p.encoded.seq_len, knockouts))
        out.append((p, knockouts, clean_run(loaded.decoder, p.encoded, capture_from=start)))
    return out


@pytest.mark.parametrize("family", ["llava", "qwen2_vl", "gemma3"])
def test_accelerator_fold_equals_the_reference_engine(loaded_family, family, tmp_path):
    loaded = loaded_family(family)
    ((prepared, knockouts, clean),) = _setup(loaded, tmp_path, n=1)
    got = torch.log_softmax(fast_logits(loaded.decoder, prepared.encoded, clean, knockouts, strategy=AcceleratorFold()), -1)
    ref = torch.log_softmax(reference_logits(loaded.decoder, prepared.encoded, knockouts), -1)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=0)
    assert (ref - torch.log_softmax(clean.logits, -1)).abs().max() > 1e-3, "the knockouts changed nothing"


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_samples_folded_together_get_their_own_logits(loaded_family, family, tmp_path):
    loaded = loaded_family(family)
    setups = _setup(loaded, tmp_path)
    strategy = AcceleratorFold()
    requests = [FoldRequest(p.encoded, clean, knockouts) for p, knockouts, clean in setups]
    together = fast_logits_batch(loaded.decoder, requests[::-1], strategy=strategy)[::-1]
    for request, got in zip(requests, together, strict=True):
        alone = fast_logits(loaded.decoder, request.encoded, request.clean, request.knockouts, strategy=strategy)
        torch.testing.assert_close(got, alone, atol=1e-5, rtol=0)
    assert (together[0][: len(together[1])] - together[1][: len(together[0])]).abs().max() > 1e-2


def _jobs(loaded, setups) -> list[FoldJob]:
    """Per sample the folds at the question (sweep windows, head-level, two flows), and one whose
    windows close after layer 0 (the later layers then promise a fully visible prefix)."""
    decoder, jobs = loaded.decoder, []
    for prepared, knockouts, clean in setups:
        t0 = prepared.groups[Group.QUESTION][0]
        early = [Knockout.for_flows(prepared.groups, [Flow.parse(f)], [0]) for f in ("image->question", "other->question")]
        for chosen in ([k for k in knockouts if k.first_target == t0], early):
            plan = plan_fold(chosen, decoder.attention_pattern(prepared.encoded), t0=t0, n=prepared.encoded.seq_len,
                             n_layers=decoder.n_layers, n_heads=decoder.n_heads)
            jobs.append(FoldJob(plan, clean, decoder.position_ids(prepared.encoded)))
    assert any(facts.prefix_visible for job in jobs for facts in map(job.plan.facts, range(1, decoder.n_layers)))
    return jobs


def test_the_layer_loop_reads_nothing_back_from_the_device(loaded_family, tmp_path):
    loaded = loaded_family("llava")
    decoder, strategy = loaded.decoder, AcceleratorFold()
    jobs = _jobs(loaded, _setup(loaded, tmp_path, n=2))
    with strategy.session(decoder):
        states = prepare_folds(jobs, decoder, strategy)
        with RefuseHostReads():
            fold_layers(states, decoder, strategy)
    results = finish_folds(states)
    assert all(isinstance(r, torch.Tensor) for r in results)
    # The check can fail: the shared-prefix CPU path does read masks back (its sampled promise check).
    with strategy.session(decoder):
        states = prepare_folds(jobs, decoder, strategy)
        with pytest.raises(AssertionError, match="read a value back"), RefuseHostReads():
            fold_layers(states, decoder, type(strategy)(fused=True, check_promise=True))


@pytest.mark.gpu
def test_on_cuda_the_layer_loop_never_synchronises_and_bfloat16_folds_match_the_reference(loaded_family, tmp_path):
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    loaded = loaded_family("llava", dtype="bfloat16", device="cuda")
    decoder, strategy = loaded.decoder, AcceleratorFold()
    setups = _setup(loaded, tmp_path, n=2)
    jobs = _jobs(loaded, setups)
    with strategy.session(decoder):
        states = prepare_folds(jobs, decoder, strategy)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            fold_layers(states, decoder, strategy)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    assert all(isinstance(r, torch.Tensor) for r in finish_folds(states))
    prepared, knockouts, clean = setups[0]
    got = torch.log_softmax(fast_logits(decoder, prepared.encoded, clean, knockouts), -1)
    ref = torch.log_softmax(reference_logits(decoder, prepared.encoded, knockouts), -1)
    assert (got - ref).abs().max() < 0.15  # bfloat16: the benchmark's oracle tolerance
