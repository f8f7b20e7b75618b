"""Run a :class:`~vlmflow.knockout.plan.FoldPlan` on a model: the fast engine's layer loop.

The executor keeps the folded hidden states ``[V, S, d_model]``, starts each variant where the
plan says (from the clean run's states, or from its parent's), runs every layer step through the
fold's attention strategy (:mod:`vlmflow.knockout.strategy`) with the clean prefix keys/values,
applies folded ablations, and returns each variant's final hidden states at the rows the plan reads
(the last position, or the last ``R`` positions of a teacher-forced answer).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from vlmflow.adapters.decoder import DecoderMap
from vlmflow.inputs import Encoded
from vlmflow.knockout.ablation import AblationValues, folded_ablation
from vlmflow.knockout.clean import CleanRun
from vlmflow.knockout.plan import FoldPlan, LayerStep
from vlmflow.knockout.strategy import FoldAttention, LayerCall


@torch.no_grad()
def run_fold(
    plan: FoldPlan,
    decoder: DecoderMap,
    encoded: Encoded,
    clean: CleanRun,
    strategy: FoldAttention,
    ablation_values: Mapping[int, AblationValues] | None = None,
) -> torch.Tensor:
    """Final hidden states ``[V, R, d_model]`` at the last ``R = plan.read_rows`` positions under each
    variant, in the caller's order.

    ``ablation_values`` maps the *folded* index of each ablation variant to its replacement vectors.
    The caller runs this inside ``strategy.session(decoder)``.

    >>> with strategy.session(decoder):                                      # doctest: +SKIP
    ...     last = run_fold(plan, decoder, encoded, clean, strategy)
    """
    values = dict(ablation_values or {})
    t0, suffix, n_var = plan.t0, plan.suffix, len(plan.variants)
    device = clean.hidden[0].device
    rows = plan.rows.to(device)
    full_positions = decoder.position_ids(encoded)
    offset = t0 - clean.start
    d_model = clean.hidden[0].shape[-1]
    hidden = torch.empty(n_var, suffix, d_model, dtype=clean.hidden[0].dtype, device=device)
    positions: dict[int, tuple[torch.Tensor, Any]] = {}  # k -> (position ids, rotary), same in every layer
    for step in plan.steps():
        layer, k = step.layer, step.active
        for variant, parent in step.entering:
            # The variant's window starts here (clean inputs), or it branches off its parent.
            hidden[variant] = clean.hidden[layer][offset:] if parent is None else hidden[parent]
        x = hidden[:k].reshape(1, k * suffix, d_model)
        if k not in positions:
            pos = decoder.select_positions(full_positions, rows.repeat(k))  # [.., kS] absolute positions
            positions[k] = (pos, decoder.rotary(x, pos))
        pos, rotary = positions[k]
        prefix = (clean.keys[layer][..., :t0, :], clean.values[layer][..., :t0, :])  # [1, kv_heads, t0, head_dim]
        with folded_ablation(decoder, layer, plan.variants[:k], values, t0, suffix):
            if step.last_rows_only:
                read = _last_rows(decoder, strategy, step, x, pos, rotary, prefix, suffix, full_positions, rows)
                hidden[:k, -step.read_rows :] = read.reshape(k, step.read_rows, d_model)
            else:
                call = LayerCall(layer, x, step.allowed, pos, rotary, prefix, None, suffix, step.prefix_visible)
                hidden[:k] = strategy.run(decoder, call).reshape(k, suffix, d_model)
    # [V, R, d_model]: the rows read of each variant, back in the caller's order (the rows are
    # permuted here, before the unembedding, not the [V, R, vocab] logits after it).
    caller_order = torch.empty(n_var, dtype=torch.long, device=device)
    caller_order[torch.tensor(plan.order, device=device)] = torch.arange(n_var, device=device)
    return hidden[caller_order, -plan.read_rows :]


def _last_rows(
    decoder: DecoderMap,
    strategy: FoldAttention,
    step: LayerStep,
    x: torch.Tensor,
    pos: torch.Tensor,
    rotary: Any,
    prefix: tuple[torch.Tensor, torch.Tensor],
    suffix: int,
    full_positions: torch.Tensor,
    rows: torch.Tensor,
) -> torch.Tensor:
    """The top layer for the last ``R`` rows of each of ``k`` folded variants: ``[1, k*R, d_model]``.

    ``x`` ``[1, k*S, d_model]`` are the layer's inputs; every row's keys/values are needed (the
    rows read attend to them), but only the read rows' attention output, output projection and MLP.
    """
    k, read = step.active, step.read_rows
    own = decoder.layer_key_values(step.layer, x, pos, rotary)  # [1, kv_heads, k*S, head_dim]
    # [k*R] query rows of the last R positions of each variant, variant-major
    last = (torch.arange(k, device=x.device)[:, None] * suffix + torch.arange(suffix - read, suffix, device=x.device)).reshape(-1)
    x_last = x[:, last]  # [1, k*R, d_model]
    pos_last = decoder.select_positions(full_positions, rows[-read:].repeat(k))
    call = LayerCall(
        layer=step.layer,
        hidden=x_last,
        allowed=step.allowed[:, :, -read:],
        position_ids=pos_last,
        rotary=decoder.rotary(x_last, pos_last),
        prefix=prefix,
        own=own,
        suffix=suffix,
        prefix_visible=step.prefix_visible,
    )
    return strategy.run(decoder, call)
