"""Shared-prefix attention equals dense attention over the block-diagonal folded layout.

Checked against torch's sdpa given the dense mask, for grouped-query and multi-head shapes,
shared and per-head masks, rows that see no prefix key and rows that see no own key, with the
fused CPU kernel for the prefix part and with the explicit fallback.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from vlmflow.knockout import prefix_attention as pa


def _case(n_heads: int, n_kv: int, per_head: bool, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    t0, suffix, k, dim = 7, 3, 4, 8
    rows = k * suffix
    query = torch.randn(1, n_heads, rows, dim, generator=gen)
    key = torch.randn(1, n_kv, t0 + rows, dim, generator=gen)
    value = torch.randn(1, n_kv, t0 + rows, dim, generator=gen)
    compact = torch.rand(1, n_heads if per_head else 1, rows, t0 + suffix, generator=gen) > 0.3
    compact[..., 0, :t0] = False  # first variant's first row: no prefix key
    compact[..., 0, t0] = True
    compact[..., suffix, t0:] = False  # second variant's first row: no own key
    compact[..., suffix, 0] = True
    return query, key, value, compact, t0, suffix


def _dense_reference(query, key, value, compact, t0, suffix, scale):
    dense = pa.compact_to_dense(compact, t0, suffix)
    group = query.shape[1] // key.shape[1]
    k_rep = key.repeat_interleave(group, dim=1)
    v_rep = value.repeat_interleave(group, dim=1)
    out = torch.nn.functional.scaled_dot_product_attention(query, k_rep, v_rep, attn_mask=dense, scale=scale)
    return out.transpose(1, 2)


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize(("n_heads", "n_kv", "per_head"), [(4, 2, False), (4, 4, True), (6, 2, True), (3, 1, False)])
def test_shared_prefix_attention_equals_dense_attention(monkeypatch, fused, n_heads, n_kv, per_head):
    monkeypatch.setattr(pa, "USE_FUSED_CPU", fused)
    query, key, value, compact, t0, suffix = _case(n_heads, n_kv, per_head)
    module = nn.Module().eval()
    token = pa._LAYOUT.set(pa.PrefixLayout(t0=t0, suffix=suffix))
    try:
        out, _ = pa.shared_prefix_attention_forward(module, query, key, value, compact, scaling=0.3)
    finally:
        pa._LAYOUT.reset(token)
    expected = _dense_reference(query, key, value, compact, t0, suffix, 0.3)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_outside_the_block_the_call_is_plain_sdpa():
    query, key, value, _, _, _ = _case(2, 2, False)
    dense = torch.ones(1, 1, query.shape[2], key.shape[2], dtype=torch.bool)
    out, _ = pa.shared_prefix_attention_forward(nn.Module().eval(), query, key, value, dense, scaling=0.3)
    expected = torch.nn.functional.scaled_dot_product_attention(query, key, value, attn_mask=dense, scale=0.3)
    torch.testing.assert_close(out, expected.transpose(1, 2))


def test_config_and_registration_are_undone_after_an_error():
    from transformers import AttentionInterface

    class Config:
        _attn_implementation = "sdpa"

    config = Config()
    with pytest.raises(RuntimeError), pa.shared_prefix_attention(config, t0=3, suffix=2):
        assert config._attn_implementation == pa.ATTENTION_NAME
        assert AttentionInterface._global_mapping[pa.ATTENTION_NAME] is pa.shared_prefix_attention_forward
        raise RuntimeError("boom")
    assert config._attn_implementation == "sdpa"
    assert pa.ATTENTION_NAME not in AttentionInterface._global_mapping
    assert pa._LAYOUT.get() is None


def test_wrong_layout_is_refused():
    query, key, value, compact, t0, suffix = _case(2, 2, False)
    token = pa._LAYOUT.set(pa.PrefixLayout(t0=t0 + 1, suffix=suffix))
    try:
        with pytest.raises(ValueError, match="shared-prefix attention expected"):
            pa.shared_prefix_attention_forward(nn.Module().eval(), query, key, value, compact)
    finally:
        pa._LAYOUT.reset(token)


@pytest.mark.parametrize("fused", [True, False])
def test_no_shared_prefix_is_attention_over_own_keys_only(monkeypatch, fused):
    # A prefix-LM (PaliGemma) knockout can change position 0: t0 = 0, every key is a variant's own.
    monkeypatch.setattr(pa, "USE_FUSED_CPU", fused)
    gen = torch.Generator().manual_seed(1)
    suffix, k, dim = 4, 3, 8
    query = torch.randn(1, 4, k * suffix, dim, generator=gen)
    key = torch.randn(1, 2, k * suffix, dim, generator=gen)
    value = torch.randn(1, 2, k * suffix, dim, generator=gen)
    compact = torch.rand(1, 1, k * suffix, suffix, generator=gen) > 0.4
    compact[..., 0] = True
    token = pa._LAYOUT.set(pa.PrefixLayout(t0=0, suffix=suffix))
    try:
        out, _ = pa.shared_prefix_attention_forward(nn.Module().eval(), query, key, value, compact, scaling=0.3)
    finally:
        pa._LAYOUT.reset(token)
    torch.testing.assert_close(out, _dense_reference(query, key, value, compact, 0, suffix, 0.3), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize(("n_heads", "n_kv", "per_head"), [(4, 2, False), (4, 4, True)])
def test_fewer_query_rows_than_keys_per_variant(monkeypatch, fused, n_heads, n_kv, per_head):
    # The top layer: only each variant's last row queries, against all its S own keys.
    monkeypatch.setattr(pa, "USE_FUSED_CPU", fused)
    query, key, value, compact, t0, suffix = _case(n_heads, n_kv, per_head, seed=2)
    k = query.shape[2] // suffix
    last = torch.arange(k) * suffix + suffix - 1
    token = pa._LAYOUT.set(pa.PrefixLayout(t0=t0, suffix=suffix, queries=1))
    try:
        out, _ = pa.shared_prefix_attention_forward(nn.Module().eval(), query[:, :, last], key, value, compact[:, :, last], scaling=0.3)
    finally:
        pa._LAYOUT.reset(token)
    expected = _dense_reference(query, key, value, compact, t0, suffix, 0.3)[:, last]
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("fused", [True, False])
def test_a_fully_visible_prefix_runs_unmasked_and_a_false_promise_is_refused(monkeypatch, fused):
    monkeypatch.setattr(pa, "USE_FUSED_CPU", fused)
    query, key, value, compact, t0, suffix = _case(4, 2, False, seed=3)
    compact[..., :t0] = True
    expected = _dense_reference(query, key, value, compact, t0, suffix, 0.3)
    token = pa._LAYOUT.set(pa.PrefixLayout(t0=t0, suffix=suffix, prefix_visible=True))
    try:
        out, _ = pa.shared_prefix_attention_forward(nn.Module().eval(), query, key, value, compact, scaling=0.3)
        torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
        compact[..., 0, 2] = False  # one blocked prefix key in the first row: the promise no longer holds
        with pytest.raises(RuntimeError, match="told the prefix is fully visible"):
            pa.shared_prefix_attention_forward(nn.Module().eval(), query, key, value, compact, scaling=0.3)
    finally:
        pa._LAYOUT.reset(token)


def test_compact_to_dense_with_one_query_row_per_variant():
    compact = torch.ones(1, 1, 2, 3, dtype=torch.bool)  # 2 variants x 1 query row, t0 = 1, S = 2
    assert pa.compact_to_dense(compact, t0=1, suffix=2, queries=1)[0, 0].int().tolist() == [[1, 1, 1, 0, 0], [1, 0, 0, 1, 1]]
