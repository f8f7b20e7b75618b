"""The accelerator fold path on CPU tensors: its merge against plain attention, its planner's device masks.

The accelerator strategy (:class:`~vlmflow.knockout.strategy.AcceleratorFold`) attends each fold's
rows to their sample's prefix and to their own variant's keys in two parts merged by log-sum-exp,
through explicit products (the same code runs on any device). Here, on CPU tensors: one call with
several folds of different prefixes, suffixes, head masks and computed rows equals plain softmax
attention over each fold's dense block-diagonal layout; half-precision inputs get float32 scores
and softmax; and the plan's device masks are the host masks, built from host facts alone.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from vlmflow.adapters.pattern import BlockPattern, CausalPattern
from vlmflow.knockout import fused_kernels as fk
from vlmflow.knockout import prefix_attention as pa
from vlmflow.knockout.plan import FoldMasks, plan_fold
from vlmflow.knockout.spec import Knockout
from vlmflow.knockout.strategy import AcceleratorFold, SharedPrefixFold, compact_mask, dense_mask

DIM = 8


def _fold(gen, n_heads, n_kv, t0, suffix, k, per_head, queries=None, dtype=torch.float32):
    """One fold's inputs: queries of its computed rows, prefix and own keys, compact mask."""
    q_rows = queries or suffix
    allowed = torch.rand(k, n_heads if per_head else 1, q_rows, t0 + suffix, generator=gen) > 0.35
    allowed[..., 0] = True  # keep every row non-empty (empty rows are the engine's error, tested elsewhere)
    if t0:
        allowed[0, :, 0, :t0] = False  # a row that sees no prefix key
        allowed[0, :, 0, t0] = True
    return {
        "query": torch.randn(n_heads, k * q_rows, DIM, generator=gen).to(dtype),
        "prefix": (torch.randn(1, n_kv, t0, DIM, generator=gen).to(dtype), torch.randn(1, n_kv, t0, DIM, generator=gen).to(dtype)),
        "own": (torch.randn(1, n_kv, k * suffix, DIM, generator=gen).to(dtype), torch.randn(1, n_kv, k * suffix, DIM, generator=gen).to(dtype)),
        "allowed": allowed,
        "t0": t0,
        "suffix": suffix,
        "queries": queries,
    }


def _plain(fold, scale):
    """Plain softmax attention (float64) of the fold's rows over ``[prefix ; every variant's keys]``, dense mask."""
    n_heads = fold["query"].shape[0]
    keys = torch.cat([fold["prefix"][0], fold["own"][0]], dim=2)[0].double()
    values = torch.cat([fold["prefix"][1], fold["own"][1]], dim=2)[0].double()
    group = n_heads // keys.shape[0]
    keys, values = keys.repeat_interleave(group, 0), values.repeat_interleave(group, 0)
    mask = dense_mask(fold["allowed"], fold["t0"], fold["suffix"])[0]  # [1|H, rows, t0 + k*S]
    scores = (fold["query"].double() @ keys.transpose(-1, -2)) * scale
    weights = torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1)
    return (weights @ values).transpose(0, 1)  # [rows, H, D]


def _call(folds, fused, dtype=torch.float32):
    """The attention function on the folds' rows in one call, as a layer hands them."""
    queries, layer_keys, layer_values, parts = [], [], [], []
    for f in folds:
        queries.append(f["query"])
        given = f["queries"] is not None  # only some rows computed: own keys come with the call
        rows = f["query"].shape[1]
        layer_keys.append(f["own"][0][0, :, :rows] if given else f["own"][0][0])
        layer_values.append(f["own"][1][0, :, :rows] if given else f["own"][1][0])
        parts.append(pa.FoldPart(f["t0"], f["suffix"], f["prefix"], compact_mask(f["allowed"]), f["queries"], f["own"] if given else None))
    call = pa.FoldCall(parts=tuple(parts), fused=fused, check_promise=fused)
    out, _ = pa.shared_prefix_attention_forward(
        nn.Module().eval(), torch.cat(queries, 1)[None], torch.cat(layer_keys, 1)[None], torch.cat(layer_values, 1)[None],
        None, scaling=0.35, vlmflow_fold=call,
    )
    assert call.done and out.dtype == dtype
    return out[0]


@pytest.mark.parametrize("fused", [False, True])
def test_several_folds_in_one_call_equal_plain_attention_per_fold(fused):
    gen = torch.Generator().manual_seed(0)
    folds = [
        _fold(gen, 4, 2, t0=7, suffix=3, k=4, per_head=False),
        _fold(gen, 4, 2, t0=11, suffix=5, k=2, per_head=True),  # another sample: longer prefix, head masks
        _fold(gen, 4, 2, t0=5, suffix=1, k=6, per_head=False),  # ->last: one row per variant
        _fold(gen, 4, 2, t0=9, suffix=4, k=3, per_head=False, queries=1),  # top layer: last rows, own keys given
        _fold(gen, 4, 2, t0=0, suffix=3, k=2, per_head=False),  # nothing shared (prefix-LM from position 0)
    ]
    out = _call(folds, fused)
    offset = 0
    for f in folds:
        rows = f["query"].shape[1]
        expected = _plain(f, 0.35)
        if f["queries"] is not None:  # the plain layout of the computed (last) rows
            full = dict(f, query=torch.zeros(f["query"].shape[0], rows * f["suffix"], DIM), queries=None)
            full["allowed"] = torch.ones(rows, f["allowed"].shape[1], f["suffix"], f["t0"] + f["suffix"], dtype=torch.bool)
            full["allowed"][:, :, -1:] = f["allowed"]
            full["query"][:, f["suffix"] - 1 :: f["suffix"]] = f["query"]
            expected = _plain(full, 0.35)[f["suffix"] - 1 :: f["suffix"]]
        torch.testing.assert_close(out[offset : offset + rows].double(), expected, atol=1e-5, rtol=1e-5)
        offset += rows


def test_half_precision_keys_get_float32_scores_and_softmax():
    gen = torch.Generator().manual_seed(1)
    fold = _fold(gen, 4, 1, t0=40, suffix=6, k=3, per_head=False, dtype=torch.bfloat16)
    fold["query"] = fold["query"] * 4  # large scores: rounding them to bfloat16 would show
    out = _call([fold], fused=False, dtype=torch.bfloat16)
    expected = _plain(fold, 0.35)  # float64 from the same bfloat16 inputs
    # Only the output's own rounding to bfloat16 remains (a relative 2^-8).
    torch.testing.assert_close(out.double(), expected, atol=1e-2, rtol=2**-7)
    rounded_scores = ((fold["query"] @ fold["prefix"][0][0].transpose(-1, -2)) * 0.35).double()  # bfloat16 products
    exact_scores = (fold["query"].double() @ fold["prefix"][0][0].double().transpose(-1, -2)) * 0.35
    assert (rounded_scores - exact_scores).abs().max() > 0.02  # what a bfloat16 product would have cost


def test_the_accelerator_strategy_is_the_shared_prefix_attention_without_host_checks():
    strategy = AcceleratorFold()
    assert isinstance(strategy, SharedPrefixFold) and strategy.packs
    assert strategy.fused is None and strategy.check_promise is False  # fused kernels on CUDA only, once checked
    assert fk.fused_kernel(torch.zeros(1, 1, 3, DIM), None) is None  # explicit products on CPU
    assert not fk.efficient_attention_works("cpu", torch.float32, DIM)


def _fake_efficient_op(q, k, v, bias, compute_lse, dropout, causal, scale):
    """Stands in for CUDA's memory-efficient kernel on CPU, with its contract: contiguous inputs, a bias
    whose rows are aligned to 16 elements, the log-sum-exp's rows padded to a multiple of 32 (garbage there)."""
    assert q.is_contiguous() and k.is_contiguous() and v.is_contiguous() and compute_lse and not causal
    scores = (q.double() @ k.double().transpose(-1, -2)) * scale
    if bias is not None:
        assert bias.stride(-2) % fk.BIAS_ALIGNMENT == 0, "bias rows not aligned"
        scores = scores + bias.double()
    lse = torch.logsumexp(scores, -1)
    padded = torch.full((*lse.shape[:-1], -(-lse.shape[-1] // 32) * 32), 123.0, dtype=torch.float32)
    padded[..., : lse.shape[-1]] = lse
    return (torch.softmax(scores, -1) @ v.double()).to(q.dtype), padded, None, None


def test_the_cuda_kernel_glue_aligns_the_bias_and_trims_the_log_sum_exp(monkeypatch):
    monkeypatch.setattr(fk, "_efficient_op", lambda: _fake_efficient_op)
    monkeypatch.setattr(pa, "fused_kernel", lambda q, fused: fk.cuda_efficient)
    gen = torch.Generator().manual_seed(3)
    folds = [_fold(gen, 4, 2, t0=13, suffix=3, k=4, per_head=False), _fold(gen, 4, 2, t0=7, suffix=5, k=2, per_head=True)]
    out = _call(folds, fused=True)
    offset = 0
    for f in folds:
        rows = f["query"].shape[1]
        torch.testing.assert_close(out[offset : offset + rows].double(), _plain(f, 0.35), atol=1e-5, rtol=1e-5)
        offset += rows


@pytest.mark.parametrize("pattern", [CausalPattern(), BlockPattern(torch.tensor([-1, 0, 0, 0, -1, -1, 1, 1, -1, -1]), (None, 3, None, 3))])
def test_device_masks_are_the_host_masks_built_from_host_facts(pattern):
    edges = (((7, 9), (1, 2, 8)),)
    variants = [Knockout(edges, (0, 1, 2)), Knockout(edges, (0, 1)), Knockout(edges, (2,), heads=(1,)), Knockout(((( 6,), (1,)),), (3,))]
    plan = plan_fold(variants, pattern, t0=6, n=10, n_layers=4, n_heads=2)
    masks = FoldMasks(plan, "cpu")  # "the device": a separate copy, built lazily per layer
    for step in plan.steps():
        facts = plan.facts(step.layer)
        assert (facts.layer, facts.active, facts.entering, facts.prefix_visible, facts.last_rows_only) == (
            step.layer, step.active, step.entering, step.prefix_visible, step.last_rows_only
        )
        assert torch.equal(masks.allowed(facts).expand_as(step.allowed), step.allowed)
        any_open = any(plan.in_window[v, step.layer] for v in range(step.active))
        assert facts.window_open == bool(any_open)
