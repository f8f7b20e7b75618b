"""Module-level ablations: zero or mean-ablate an attention or MLP output at chosen positions and layers.

An :class:`Ablation` replaces the output of one *site* of each layer in ``layers`` — the attention
block's output (after the output projection, before the residual add) or the MLP block's output
(before the residual add) — at the sequence ``positions``, with

* ``zero``: the zero vector;
* ``mean``: the clean model's mean output of the same site and layer over ``mean_over`` positions
  of the same sample (default: the ablated positions themselves), so the ablated positions keep
  the average and lose what distinguishes them. The means are taken from one extra clean forward.

Like a :class:`~vlmflow.knockout.spec.Knockout` it is a value; it carries positions, not groups.
Both engines apply it: the reference path (:func:`reference_ablation_logits`, forward hooks on the
site modules of a plain full forward) and the fast folded engine
(:func:`vlmflow.knockout.fast.fast_logits`, which accepts ablations next to knockouts and applies
them with :func:`folded_ablation` inside each layer call). An ablation at positions ``>= t0`` in
layers ``>= a`` changes nothing before ``t0`` or below ``a``, exactly like a knockout, which is
what lets the fast engine recompute only the suffix.

Dataset-level mean ablation (means over many samples) is not covered: pass those as zero-centred
data to your own hooks, or extend :func:`replacement_values`.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import torch
from torch import nn

from vlmflow.adapters.decoder import DecoderMap
from vlmflow.errors import ConfigError, UnsupportedModelError, VlmflowError
from vlmflow.inputs import Encoded
from vlmflow.positions.groups import Group, PositionGroups


class Site(StrEnum):
    """Which block output an ablation replaces (values are what users type)."""

    ATTENTION = "attn"  # attention block output (after o_proj), before the residual add
    MLP = "mlp"  # MLP block output, before the residual add


class AblationMode(StrEnum):
    """What the ablated outputs are replaced with."""

    ZERO = "zero"
    MEAN = "mean"  # the clean mean over `mean_over` positions of the same sample


class AblationHookError(VlmflowError, RuntimeError):
    """A site module was called in a way the ablation hook cannot handle safely."""


@dataclass(frozen=True)
class Ablation:
    """Replace ``site``'s output at ``positions`` in every layer of ``layers``.

    >>> a = Ablation(Site.MLP, layers=(2, 3), positions=(5, 7), mode=AblationMode.MEAN)
    >>> a.first_target, a.first_layer, a.is_empty
    (5, 2, False)
    """

    site: Site
    layers: tuple[int, ...]
    positions: tuple[int, ...]
    mode: AblationMode = AblationMode.ZERO
    mean_over: tuple[int, ...] | None = None  # positions averaged for mode=mean; None: `positions`

    def __post_init__(self) -> None:
        if not isinstance(self.site, Site):
            raise ConfigError(f"ablation site must be a Site ({', '.join(s.value for s in Site)}), got {self.site!r}")
        if not isinstance(self.mode, AblationMode):
            valid = ", ".join(m.value for m in AblationMode)
            raise ConfigError(f"ablation mode must be an AblationMode ({valid}), got {self.mode!r}")
        if not self.layers:
            raise ConfigError("an ablation needs at least one layer")
        for name, values in (("layers", self.layers), ("positions", self.positions)):
            if list(values) != sorted(set(values)):
                raise ConfigError(f"ablation {name} must be sorted and unique, got {values}")
        if self.mean_over is not None:
            if self.mode is not AblationMode.MEAN:
                raise ConfigError("mean_over is only meaningful with mode=mean")
            if not self.mean_over:
                raise ConfigError("mean_over=() averages nothing; use None for the ablated positions")

    @classmethod
    def for_group(
        cls,
        groups: PositionGroups,
        group: Group,
        site: Site,
        layers: Iterable[int],
        mode: AblationMode = AblationMode.ZERO,
        mean_over: Group | None = None,
    ) -> Ablation:
        """The ablation of ``site`` at a group's positions (raises if a group is unavailable).

        >>> g = PositionGroups(6, {Group.IMAGE: (1, 2, 3), Group.LAST: (5,)})
        >>> Ablation.for_group(g, Group.IMAGE, Site.ATTENTION, [0, 1]).positions
        (1, 2, 3)
        """
        return cls(
            site=site,
            layers=tuple(sorted(set(layers))),
            positions=groups[group],
            mode=mode,
            mean_over=None if mean_over is None else groups[mean_over],
        )

    @property
    def is_empty(self) -> bool:
        """True when no position is ablated (the model is unchanged)."""
        return not self.positions

    @property
    def first_target(self) -> int:
        """The first position whose computation changes; everything before it is untouched."""
        return min(self.positions) if self.positions else -1

    @property
    def first_layer(self) -> int:
        return min(self.layers)

    @property
    def averaged_positions(self) -> tuple[int, ...]:
        """Positions whose clean outputs give the replacement value (mode=mean)."""
        return self.mean_over if self.mean_over is not None else self.positions


#: Replacement vectors of one ablation: layer -> ``[d_model]`` (model dtype, model device).
AblationValues = dict[int, torch.Tensor]


def site_module(decoder: DecoderMap, site: Site, layer: int) -> nn.Module:
    """The module whose output is ``site`` in decoder layer ``layer``.

    Attention and MLP come from the decoder map (:meth:`DecoderMap.attention`,
    :meth:`DecoderMap.mlp`); a decoder layer without an MLP child gives a clear error.
    """
    if site is Site.ATTENTION:
        return decoder.attention(layer)
    try:
        return decoder.mlp(layer)
    except ConfigError as exc:
        raise UnsupportedModelError(f"{exc}; MLP ablations need the family's decoder map to name it") from None


def check_ablations(ablations: Sequence[Ablation], n_layers: int, seq_len: int) -> None:
    """Raise :class:`ConfigError` if an ablation names a layer or position the model/sample lacks."""
    for a in ablations:
        bad = [layer for layer in a.layers if not 0 <= layer < n_layers]
        if bad:
            raise ConfigError(f"ablation layers {bad} out of range; the model has layers 0..{n_layers - 1}")
        for name, values in (("positions", a.positions), ("mean_over", a.mean_over or ())):
            bad = [p for p in values if not 0 <= p < seq_len]
            if bad:
                raise ConfigError(f"ablation {name} {bad} out of range; the sequence has positions 0..{seq_len - 1}")


def _output_tensor(output: Any) -> torch.Tensor:
    # Attention modules return (hidden, weights); MLPs return the hidden tensor [batch, query, d_model].
    return output[0] if isinstance(output, tuple) else output


def _with_tensor(output: Any, tensor: torch.Tensor) -> Any:
    return (tensor, *output[1:]) if isinstance(output, tuple) else tensor


@torch.no_grad()
def replacement_values(decoder: DecoderMap, encoded: Encoded, ablations: Sequence[Ablation]) -> list[AblationValues]:
    """Per ablation, the ``[d_model]`` replacement vector of each of its layers.

    Zero ablations need no forward. Mean ablations share one clean full forward whose forward hooks
    average each needed (site, layer) output over the requested positions (in float32, then cast
    back to the model dtype); hooks are removed in ``finally``.
    """
    dtype = decoder.dtype
    device = encoded.device
    d_model = decoder.hidden_size
    wanted: dict[tuple[Site, int], set[tuple[int, ...]]] = {}
    for a in ablations:
        if a.mode is AblationMode.MEAN and not a.is_empty:
            for layer in a.layers:
                wanted.setdefault((a.site, layer), set()).add(a.averaged_positions)
    means: dict[tuple[Site, int, tuple[int, ...]], torch.Tensor] = {}
    if wanted:
        n = encoded.seq_len
        handles = []

        def make_hook(site: Site, layer: int, sets: set[tuple[int, ...]]) -> Any:
            def hook(module: nn.Module, args: tuple, output: Any) -> None:
                hidden = _output_tensor(output)  # [1, seq, d_model]
                if hidden.shape[-2] != n:
                    raise AblationHookError(f"layer {layer} {site.value}: expected the full prompt of {n} positions")
                for positions in sets:
                    means[(site, layer, positions)] = hidden[0, list(positions)].float().mean(0).to(dtype)

            return hook

        try:
            for (site, layer), sets in wanted.items():
                module = site_module(decoder, site, layer)
                handles.append(module.register_forward_hook(make_hook(site, layer, sets)))
            decoder.model(**encoded.inputs, logits_to_keep=1)
        finally:
            for handle in handles:
                handle.remove()
    out: list[AblationValues] = []
    for a in ablations:
        if a.mode is AblationMode.ZERO or a.is_empty:
            zero = torch.zeros(d_model, dtype=dtype, device=device)
            out.append({layer: zero for layer in a.layers})
        else:
            out.append({layer: means[(a.site, layer, a.averaged_positions)] for layer in a.layers})
    return out


def _replace_rows(hidden: torch.Tensor, rows: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """``hidden`` ``[1, query, d_model]`` with ``rows`` replaced by ``value`` ``[rows|1, d_model]`` (a copy)."""
    hidden = hidden.clone()
    hidden[0, rows] = value.to(hidden.dtype)
    return hidden


@contextmanager
def module_ablation(decoder: DecoderMap, encoded: Encoded, ablation: Ablation, values: AblationValues) -> Iterator[None]:
    """Inside the block, a full forward of ``encoded`` runs with ``ablation`` applied.

    Forward hooks on the site module of every ablated layer overwrite the rows of ``positions``;
    they refuse calls that do not cover the whole prompt (e.g. generation steps) and are removed in
    ``finally``.

    >>> values = replacement_values(decoder, encoded, [ablation])[0]      # doctest: +SKIP
    >>> with module_ablation(decoder, encoded, ablation, values):         # doctest: +SKIP
    ...     logits = decoder.model(**encoded.inputs).logits
    """
    check_ablations([ablation], decoder.n_layers, encoded.seq_len)
    n = encoded.seq_len
    device = encoded.device
    rows = torch.as_tensor(ablation.positions, dtype=torch.long, device=device)
    handles = []

    def make_hook(layer: int) -> Any:
        def hook(module: nn.Module, args: tuple, output: Any) -> Any:
            hidden = _output_tensor(output)
            if hidden.shape[-2] != n:
                raise AblationHookError(
                    f"layer {layer} {ablation.site.value}: saw {hidden.shape[-2]} query positions, expected the "
                    f"full prompt of {n}; the reference ablation applies to a single full forward only"
                )
            return _with_tensor(output, _replace_rows(hidden, rows, values[layer][None]))

        return hook

    try:
        if not ablation.is_empty:
            for layer in ablation.layers:
                module = site_module(decoder, ablation.site, layer)
                handles.append(module.register_forward_hook(make_hook(layer)))
        yield
    finally:
        for handle in handles:
            handle.remove()


@torch.no_grad()
def reference_ablation_logits(decoder: DecoderMap, encoded: Encoded, ablations: Sequence[Ablation]) -> torch.Tensor:
    """Last-position logits ``[len(ablations), vocab]`` (float32), one full forward per ablation.

    >>> logits = reference_ablation_logits(decoder, encoded, [ablation])   # doctest: +SKIP
    """
    values = replacement_values(decoder, encoded, ablations)
    out = []
    for ablation, vals in zip(ablations, values, strict=True):
        with module_ablation(decoder, encoded, ablation, vals):
            logits = decoder.model(**encoded.inputs, logits_to_keep=1).logits
        out.append(logits[0, -1].float())
    return torch.stack(out) if out else torch.empty(0)


@contextmanager
def folded_ablation(
    decoder: DecoderMap,
    layer: int,
    variants: Sequence[Any],
    values: Mapping[int, AblationValues],
    t0: int,
    suffix: int,
) -> Iterator[None]:
    """Apply the ablations among folded ``variants`` to one layer call of the fast engine.

    In the folded layout variant ``v``'s suffix position ``p`` is query row ``v * suffix + (p - t0)``
    of the single batch row (see :mod:`vlmflow.knockout.fast`). ``values`` maps a variant index to
    its replacement vectors. Only variants that are :class:`Ablation` with ``layer`` in their layers
    get hooks; the hooks expect exactly ``len(variants) * suffix`` query rows and are removed in
    ``finally``.
    """
    per_site: dict[Site, tuple[list[torch.Tensor], list[torch.Tensor]]] = {}
    for v, variant in enumerate(variants):
        if not isinstance(variant, Ablation) or variant.is_empty or layer not in variant.layers:
            continue
        value = values[v][layer]
        positions = torch.as_tensor(variant.positions, dtype=torch.long, device=value.device)
        rows, vals = per_site.setdefault(variant.site, ([], []))
        rows.append(v * suffix + positions - t0)
        vals.append(value[None].expand(len(positions), -1))
    expected = len(variants) * suffix

    def make_hook(site: Site, rows: torch.Tensor, vals: torch.Tensor) -> Any:
        def hook(module: nn.Module, args: tuple, output: Any) -> Any:
            hidden = _output_tensor(output)
            if hidden.shape[-2] != expected:
                raise AblationHookError(
                    f"layer {layer} {site.value}: saw {hidden.shape[-2]} folded query rows, expected {expected}"
                )
            return _with_tensor(output, _replace_rows(hidden, rows, vals))

        return hook

    with ExitStack() as stack:
        for site, (rows, vals) in per_site.items():
            module = site_module(decoder, site, layer)
            handle = module.register_forward_hook(make_hook(site, torch.cat(rows), torch.cat(vals)))
            stack.callback(handle.remove)
        yield
