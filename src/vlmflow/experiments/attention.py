"""Group-to-group attention mass per layer, from a clean run, without full attention matrices.

For a layer ``l``, target group ``T`` (query positions) and source group ``S`` (key positions),
the mass is the attention probability a query of ``T`` puts on the keys of ``S``, summed over those
keys and averaged over the queries of ``T``: ``mean_{q in T} sum_{k in S} A_h[q, k]``, per head ``h``
and averaged over heads. Each query's probabilities sum to 1 over all keys, so the masses of
disjoint sources that cover the sequence sum to 1.

How the probabilities are obtained: the clean run already holds, per layer, the keys/values of all
positions and the hidden states entering the layer at the target positions. The decoder layer is
re-run on chunks of at most ``max_chunk_queries`` target rows against those clean keys (a
read-only cache), with the model's attention temporarily switched to the ``eager`` kernel, which
returns the probabilities; a forward hook on the attention module reads them. So at most
``[head, chunk, seq]`` probabilities exist at a time, never ``[head, seq, seq]``, and it works the
same whatever attention implementation the model was loaded with (the switch is undone in
``finally``). The cost is about one extra forward over the target rows.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from typing import Any

import torch
from torch import nn

from vlmflow.adapters.decoder import DecoderMap
from vlmflow.experiments.prepare import PreparedSample
from vlmflow.experiments.settings import AttentionSettings
from vlmflow.inputs import Encoded
from vlmflow.knockout.clean import CleanRun
from vlmflow.knockout.mask import to_kernel_mask
from vlmflow.positions.groups import Group, PositionGroups
from vlmflow.results.tables import AttentionRow


def _available(groups: PositionGroups, wanted: tuple[Group, ...]) -> list[Group]:
    return [g for g in wanted if g in groups and groups[g]]


def attention_capture_from(groups: PositionGroups, settings: AttentionSettings) -> int:
    """First position whose hidden states the clean run must keep (the first target position)."""
    targets = _available(groups, settings.targets)
    return min((groups[g][0] for g in targets), default=groups.seq_len - 1)


def eager_attention(decoder: DecoderMap) -> AbstractContextManager[None]:
    """Inside the block the decoder's attention modules use the ``eager`` kernel (which returns
    probabilities); the previous implementation is restored in ``finally``.

    >>> with eager_attention(decoder):                                   # doctest: +SKIP
    ...     probs = attention_probs(decoder, encoded, clean, 3, rows)
    """
    return decoder.attention_function("eager")


class _CleanKV:
    """Read-only cache standing in for the layer's KV cache: always the clean keys/values of all
    positions ``[1, kv_heads, seq, head_dim]``. The recomputed keys of the query rows are identical
    to the clean ones at those positions (same inputs), so ignoring them is exact."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        self.keys, self.values = keys, values

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: Any, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        return self.keys, self.values

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return int(self.keys.shape[-2])


@torch.no_grad()
def attention_probs(
    decoder: DecoderMap, encoded: Encoded, clean: CleanRun, layer: int, rows: torch.Tensor
) -> torch.Tensor:
    """Clean attention probabilities ``[head, len(rows), seq]`` (float32) of query positions ``rows``
    in ``layer``, recomputed from the clean run. Call inside :func:`eager_attention`.

    >>> with eager_attention(decoder):                                      # doctest: +SKIP
    ...     probs = attention_probs(decoder, encoded, clean, 3, torch.tensor([n - 1]))
    """
    if int(rows.min()) < clean.start:
        raise ValueError(f"clean run kept hidden states from position {clean.start}, attention needs {int(rows.min())}")
    n = encoded.seq_len
    device = clean.hidden[0].device
    rows = rows.to(device)
    x = clean.hidden[layer].index_select(0, rows - clean.start)[None]  # [1, rows, d_model]
    pos = decoder.select_positions(decoder.position_ids(encoded), rows)
    allowed = decoder.attention_pattern(encoded).allowed(layer, rows, n)[None, None]  # [1, 1, rows, seq]
    mask = to_kernel_mask(allowed, "eager", decoder.dtype)
    captured: list[torch.Tensor] = []

    def keep(module: nn.Module, args: tuple, output: Any) -> None:
        weights = output[1] if isinstance(output, tuple) and len(output) > 1 else None
        if weights is None:
            raise RuntimeError(f"layer {layer}: the attention module returned no probabilities under the eager kernel")
        captured.append(weights[0].float())  # [head, rows, seq]

    handle = decoder.attention(layer).register_forward_hook(keep)
    try:
        cache = _CleanKV(clean.keys[layer], clean.values[layer])
        decoder.run_layer(layer, x, mask, pos, decoder.rotary(x, pos), cache)
    finally:
        handle.remove()
    return captured[0]


@torch.no_grad()
def group_attention_mass(
    decoder: DecoderMap,
    encoded: Encoded,
    groups: PositionGroups,
    clean: CleanRun,
    settings: AttentionSettings,
) -> dict[tuple[int, Group, Group], torch.Tensor]:
    """``(layer, target, source) -> [head]`` attention mass (float32, CPU) for the available groups.

    >>> mass = group_attention_mass(decoder, encoded, groups, clean, AttentionSettings())  # doctest: +SKIP
    >>> mass[(0, Group.LAST, Group.IMAGE)].mean()                                                # doctest: +SKIP
    """
    targets = _available(groups, settings.targets)
    sources = _available(groups, settings.sources)
    if not targets or not sources:
        return {}
    n = encoded.seq_len
    device = clean.hidden[0].device
    rows = sorted({p for g in targets for p in groups[g]})
    index_of = {p: i for i, p in enumerate(rows)}
    source_mask = torch.zeros(len(sources), n, dtype=torch.float32, device=device)  # [source, seq]
    for s, group in enumerate(sources):
        source_mask[s, list(groups[group])] = 1.0
    row_tensor = torch.as_tensor(rows, dtype=torch.long, device=device)
    out: dict[tuple[int, Group, Group], torch.Tensor] = {}
    with eager_attention(decoder):
        for layer in range(decoder.n_layers):
            per_row = []
            for lo in range(0, len(rows), settings.max_chunk_queries):
                chunk = row_tensor[lo : lo + settings.max_chunk_queries]
                probs = attention_probs(decoder, encoded, clean, layer, chunk)  # [head, chunk, seq]
                per_row.append(probs @ source_mask.T)  # [head, chunk, source]
            mass = torch.cat(per_row, dim=1).cpu()  # [head, rows, source]
            for target in targets:
                sel = [index_of[p] for p in groups[target]]
                target_mass = mass[:, sel].mean(dim=1)  # [head, source]
                for s, source in enumerate(sources):
                    out[(layer, target, source)] = target_mass[:, s]
    return out


def attention_rows(
    decoder: DecoderMap,
    prepared: PreparedSample,
    clean: CleanRun,
    settings: AttentionSettings,
    *,
    task: str = "",
) -> list[AttentionRow]:
    """Rows of the ``attention`` table for one sample (see :func:`group_attention_mass`)."""
    groups = prepared.groups
    masses = group_attention_mass(decoder, prepared.encoded, groups, clean, settings)
    return [
        AttentionRow(
            sample_id=prepared.sample.sample_id,
            task=task,
            layer=layer,
            target=target.value,
            source=source.value,
            mass=float(per_head.mean()),
            mass_per_head=per_head.tolist(),
            n_target=len(groups[target]),
            n_source=len(groups[source]),
        )
        for (layer, target, source), per_head in masses.items()
    ]

