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


def _attend(query, key, value, compact, t0, suffix, fused=True, queries=None, prefix_visible=False):
    """The attention function given ``[prefix ; own]`` keys, as the engine hands them: the layer's keys of
    its computed rows, the prefix (and, for fewer query rows than keys, the own keys) in the call."""
    own = None
    layer_key, layer_value = key[:, :, t0:], value[:, :, t0:]
    if queries is not None:  # only some rows are computed: their own keys come with the call
        own = (layer_key, layer_value)
        layer_key, layer_value = layer_key[:, :, : query.shape[2]], layer_value[:, :, : query.shape[2]]
    part = pa.FoldPart(t0, suffix, (key[:, :, :t0], value[:, :, :t0]), compact, queries, own, prefix_visible)
    fold = pa.FoldCall(parts=(part,), fused=fused)
    out, _ = pa.shared_prefix_attention_forward(
        nn.Module().eval(), query, layer_key, layer_value, None, scaling=0.3, vlmflow_fold=fold
    )
    assert fold.done
    return out


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize(("n_heads", "n_kv", "per_head"), [(4, 2, False), (4, 4, True), (6, 2, True), (3, 1, False)])
def test_shared_prefix_attention_equals_dense_attention(fused, n_heads, n_kv, per_head):
    query, key, value, compact, t0, suffix = _case(n_heads, n_kv, per_head)
    out = _attend(query, key, value, compact, t0, suffix, fused)
    expected = _dense_reference(query, key, value, compact, t0, suffix, 0.3)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_without_fold_inputs_the_call_is_plain_sdpa():
    query, key, value, _, _, _ = _case(2, 2, False)
    dense = torch.ones(1, 1, query.shape[2], key.shape[2], dtype=torch.bool)
    out, _ = pa.shared_prefix_attention_forward(nn.Module().eval(), query, key, value, dense, scaling=0.3)
    expected = torch.nn.functional.scaled_dot_product_attention(query, key, value, attn_mask=dense, scale=0.3)
    torch.testing.assert_close(out, expected.transpose(1, 2))


def test_registration_is_idempotent_and_public():
    from transformers import AttentionInterface

    assert pa.register() == pa.register() == pa.ATTENTION_NAME
    assert AttentionInterface()[pa.ATTENTION_NAME] is pa.shared_prefix_attention_forward


def test_wrong_layout_is_refused():
    query, key, value, compact, t0, suffix = _case(2, 2, False)
    fold = pa.FoldCall(parts=(pa.FoldPart(t0 + 1, suffix, (key[:, :, :t0], value[:, :, :t0]), compact),))
    with pytest.raises(ValueError, match="shared-prefix attention expected"):
        pa.shared_prefix_attention_forward(nn.Module().eval(), query, key[:, :, t0:], value[:, :, t0:], None, vlmflow_fold=fold)
    assert not fold.done
    fold = pa.FoldCall(parts=(pa.FoldPart(t0, suffix, (key[:, :, :t0], value[:, :, :t0]), compact[..., :-1]),))
    with pytest.raises(ValueError, match="compact bool mask"):
        pa.shared_prefix_attention_forward(nn.Module().eval(), query, key[:, :, t0:], value[:, :, t0:], None, vlmflow_fold=fold)
    soft = pa.FoldCall(parts=(pa.FoldPart(t0, suffix, (key[:, :, :t0], value[:, :, :t0]), compact),))
    with pytest.raises(ValueError, match="soft-capping"):
        pa.shared_prefix_attention_forward(nn.Module().eval(), query, key[:, :, t0:], value[:, :, t0:], None, vlmflow_fold=soft, softcap=30.0)


@pytest.mark.parametrize("fused", [True, False])
def test_no_shared_prefix_is_attention_over_own_keys_only(fused):
    # A prefix-LM (PaliGemma) knockout can change position 0: t0 = 0, every key is a variant's own.
    gen = torch.Generator().manual_seed(1)
    suffix, k, dim = 4, 3, 8
    query = torch.randn(1, 4, k * suffix, dim, generator=gen)
    key = torch.randn(1, 2, k * suffix, dim, generator=gen)
    value = torch.randn(1, 2, k * suffix, dim, generator=gen)
    compact = torch.rand(1, 1, k * suffix, suffix, generator=gen) > 0.4
    compact[..., 0] = True
    out = _attend(query, key, value, compact, 0, suffix, fused)
    torch.testing.assert_close(out, _dense_reference(query, key, value, compact, 0, suffix, 0.3), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize(("n_heads", "n_kv", "per_head"), [(4, 2, False), (4, 4, True)])
def test_fewer_query_rows_than_keys_per_variant(fused, n_heads, n_kv, per_head):
    # The top layer: only each variant's last row queries, against all its S own keys.
    query, key, value, compact, t0, suffix = _case(n_heads, n_kv, per_head, seed=2)
    k = query.shape[2] // suffix
    last = torch.arange(k) * suffix + suffix - 1
    out = _attend(query[:, :, last], key, value, compact[:, :, last], t0, suffix, fused, queries=1)
    expected = _dense_reference(query, key, value, compact, t0, suffix, 0.3)[:, last]
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("fused", [True, False])
def test_a_fully_visible_prefix_runs_unmasked_and_a_false_promise_is_refused(fused):
    query, key, value, compact, t0, suffix = _case(4, 2, False, seed=3)
    compact[..., :t0] = True
    expected = _dense_reference(query, key, value, compact, t0, suffix, 0.3)
    out = _attend(query, key, value, compact, t0, suffix, fused, prefix_visible=True)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    compact[..., 0, 2] = False  # one blocked prefix key in the first row: the promise no longer holds
    with pytest.raises(RuntimeError, match="told the prefix is fully visible"):
        _attend(query, key, value, compact, t0, suffix, fused, prefix_visible=True)
