"""Run fold plans on a model: the fast engine's layer loop.

A :class:`FoldJob` is one :class:`~vlmflow.knockout.plan.FoldPlan` with the clean run it starts
from. :func:`run_folds` runs several jobs together (the folds of several samples): per decoder
layer, every job's active rows go into one layer call (one :class:`~vlmflow.knockout.strategy.Segment`
each, one after another), so the layer's weights are read once for all of them. Per job it keeps
the folded hidden states ``[V, S, d_model]``, starts each variant where its plan says (from the
clean run's states, or from its parent's), adds what the model adds between layers (the clean run's
:class:`~vlmflow.adapters.additions.ResidualAdditions`, e.g. Qwen3-VL's DeepStack features at image
positions) to the recomputed rows, and returns each variant's final hidden states at the rows the
plan reads (the last position, or the last ``R`` positions of a teacher-forced answer).

Nothing inside the layer loop reads a value back from the device: what decides the shape of a call
(active variants, open windows, promises) are host values computed before the loop
(:meth:`FoldPlan.facts <vlmflow.knockout.plan.FoldPlan.facts>`); masks are built on the device
(:class:`~vlmflow.knockout.plan.FoldMasks`), and their safety checks (no query row without a key,
every "prefix visible" promise) accumulate in per-job device flags that are read once, after the
loop. A job whose flag is set becomes a :class:`~vlmflow.errors.SampleError` (or a
``RuntimeError`` for a broken promise, an engine bug) without touching the other jobs' results.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Any

import torch

from vlmflow.adapters.decoder import DecoderMap
from vlmflow.errors import SampleError
from vlmflow.inputs import Encoded
from vlmflow.knockout.ablation import Ablation, AblationValues, folded_ablation
from vlmflow.knockout.clean import CleanRun
from vlmflow.knockout.mask import any_last
from vlmflow.knockout.plan import FoldMasks, FoldPlan, LayerFacts
from vlmflow.knockout.strategy import FoldAttention, LayerCall, Segment

__all__ = ["FoldJob", "FoldState", "fold_layers", "prepare_folds", "finish_folds", "run_fold", "run_folds"]


@dataclass(frozen=True)
class FoldJob:
    """One plan to run, with what it reads.

    Attributes:
        plan: the fold plan (built on the host).
        clean: the sample's clean run (its hidden states and keys/values are on the model's device).
        positions: the sample's full position ids ``[..., 1, n]`` (:meth:`DecoderMap.position_ids`).
        ablation_values: the replacement vectors of each ablation variant, by *folded* index.
    """

    plan: FoldPlan
    clean: CleanRun
    positions: torch.Tensor
    ablation_values: Mapping[int, AblationValues] = field(default_factory=dict)


@dataclass
class FoldState:
    """One job during the layer loop: its masks and hidden states on the device, its host facts, its flags."""

    job: FoldJob
    masks: FoldMasks
    facts: dict[int, LayerFacts]
    hidden: torch.Tensor  # [V, S, d_model]
    empty_row: torch.Tensor  # 0-dim bool: some computed row could read no key
    broken_promise: torch.Tensor  # 0-dim bool: a "prefix visible" row had a prefix key hidden
    positions: dict[tuple[int, bool], torch.Tensor] = field(default_factory=dict)

    @property
    def plan(self) -> FoldPlan:
        return self.job.plan

    def position_ids(self, decoder: DecoderMap, k: int, last_rows: bool) -> torch.Tensor:
        """Position ids of the ``k`` active variants' rows (``[..., 1, k*S]``) or of their last ``R`` rows
        (``[..., 1, k*R]``)."""
        if (k, last_rows) not in self.positions:
            rows = self.masks.rows[-self.plan.read_rows :] if last_rows else self.masks.rows
            self.positions[(k, last_rows)] = decoder.select_positions(self.job.positions, rows.repeat(k))
        return self.positions[(k, last_rows)]


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

    One plan alone (:func:`run_folds`); raises :class:`SampleError` for a knockout that leaves a row
    with no key. The caller runs this inside ``strategy.session(decoder)``.

    >>> with strategy.session(decoder):                                      # doctest: +SKIP
    ...     last = run_fold(plan, decoder, encoded, clean, strategy)
    """
    job = FoldJob(plan, clean, decoder.position_ids(encoded), dict(ablation_values or {}))
    (out,) = run_folds([job], decoder, strategy)
    if isinstance(out, SampleError):
        raise out
    return out


@torch.no_grad()
def run_folds(jobs: Sequence[FoldJob], decoder: DecoderMap, strategy: FoldAttention) -> list[torch.Tensor | SampleError]:
    """Per job, the final hidden states ``[V, R, d_model]`` at the last ``R = plan.read_rows`` positions in
    the caller's order,
    or the :class:`SampleError` that job's knockouts raise; all jobs computed together.

    Jobs with ablations run alone (their hooks expect one fold's rows); a strategy that does not
    pack (:attr:`FoldAttention.packs`) takes one job.
    """
    states = prepare_folds(jobs, decoder, strategy)
    fold_layers(states, decoder, strategy)
    return finish_folds(states)


def prepare_folds(jobs: Sequence[FoldJob], decoder: DecoderMap, strategy: FoldAttention) -> list[FoldState]:
    """Everything the layer loop needs, made before it: device masks, host facts, buffers, flags."""
    if not jobs:
        raise ValueError("run_folds needs at least one job")
    if len(jobs) > 1 and not strategy.packs:
        raise ValueError(f"{type(strategy).__name__} runs one fold per layer call, got {len(jobs)} jobs")
    if len(jobs) > 1 and any(isinstance(v, Ablation) for job in jobs for v in job.plan.variants):
        raise ValueError("a fold with ablations runs alone (its hooks expect one fold's rows)")
    states = []
    for job in jobs:
        plan, clean = job.plan, job.clean
        if plan.t0 < clean.start:
            raise ValueError(
                f"clean run kept hidden states from position {clean.start}, but a knockout can change position "
                f"{plan.t0} (use affected_starts() to choose capture_from)"
            )
        device = clean.hidden[0].device
        flag = torch.zeros((), dtype=torch.bool, device=device)
        masks = FoldMasks(plan, device)
        for layer in range(plan.first_layer, plan.n_layers):
            masks.base(layer)  # built now: a pattern may hold host tensors it would copy to the device
        states.append(
            FoldState(
                job=job,
                masks=masks,
                facts={layer: plan.facts(layer) for layer in range(plan.first_layer, plan.n_layers)},
                hidden=torch.empty(len(plan.variants), plan.suffix, clean.hidden[0].shape[-1], dtype=clean.hidden[0].dtype, device=device),
                empty_row=flag,
                broken_promise=flag.clone(),
            )
        )
    return states


def fold_layers(states: Sequence[FoldState], decoder: DecoderMap, strategy: FoldAttention) -> None:
    """The layer loop: per layer one call with every job's active rows (reads nothing back from the device)."""
    rotary: dict[tuple, Any] = {}
    for layer in range(min(s.plan.first_layer for s in states), decoder.n_layers):
        active = [(s, s.facts[layer]) for s in states if layer in s.facts and s.facts[layer].active]
        segments, xs, positions, key_rows = [], [], [], []
        for state, facts in active:
            segment, x, pos = _segment(state, facts, decoder)
            segments.append(segment)
            xs.append(x)
            positions.append(pos)
            if facts.last_rows_only:
                key_rows.append(state)
        if key_rows:
            segments = _with_own_keys(decoder, layer, active, segments)
        hidden = torch.cat(xs, dim=1)  # [1, R, d_model]
        pos = torch.cat(positions, dim=-1)
        key = tuple((id(state), facts.active, facts.last_rows_only) for state, facts in active)
        if key not in rotary:
            rotary = {key: decoder.rotary(hidden, pos)}  # same in every layer while the active sets stay
        with ExitStack() as stack:
            if len(active) == 1:
                state, facts = active[0]
                plan = state.plan
                stack.enter_context(
                    folded_ablation(decoder, layer, plan.variants[: facts.active], state.job.ablation_values, plan.t0, plan.suffix)
                )
            out = strategy.run(decoder, LayerCall(layer, hidden, pos, rotary[key], tuple(segments)))
        offset = 0
        for (state, facts), segment in zip(active, segments, strict=True):
            part = out[0, offset : offset + segment.rows]
            offset += segment.rows
            rows = state.masks.rows  # [S] sequence positions of the fold's rows
            if facts.last_rows_only:  # [k*R, d_model]: the last R rows of each variant
                read = facts.read_rows
                state.hidden[: facts.active, -read:] = _added(state.job.clean, layer, part.view(facts.active, read, -1), rows[-read:])
            else:
                state.hidden[: facts.active] = _added(state.job.clean, layer, part.view(facts.active, state.plan.suffix, -1), rows)


def _added(clean: CleanRun, layer: int, out: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Layer ``layer``'s output ``[k, Q, d_model]`` at positions ``rows`` ``[Q]`` plus what the model adds
    there before the next layer (nothing for a plain stack of layers)."""
    return out if clean.additions is None else clean.additions.after_layer(layer, out, rows)


def _segment(state: FoldState, facts: LayerFacts, decoder: DecoderMap) -> tuple[Segment, torch.Tensor, torch.Tensor]:
    """One job's part of a layer call: its segment, its computed rows ``[1, rows, d]`` and their position ids."""
    plan, clean, layer, k = state.plan, state.job.clean, facts.layer, facts.active
    for variant, parent in facts.entering:
        # The variant's window starts here (clean inputs), or it branches off its parent.
        state.hidden[variant] = clean.hidden[layer][plan.t0 - clean.start :] if parent is None else state.hidden[parent]
    allowed = state.masks.allowed(facts)  # [k, H|1, S, n]
    if facts.window_open:
        state.empty_row |= ~any_last(allowed).all()
    if facts.prefix_visible:
        state.broken_promise |= ~allowed[..., : plan.t0].all()
    prefix = (clean.keys[layer][..., : plan.t0, :], clean.values[layer][..., : plan.t0, :])  # [1, kv, t0, D]
    x = state.hidden[:k].reshape(1, k * plan.suffix, -1)
    if facts.last_rows_only:  # only each variant's last R rows: their own keys come from all rows (below)
        read = facts.read_rows
        allowed = allowed[:, :, -read:]  # [k, H|1, R, n]
        x = x.view(1, k, plan.suffix, -1)[:, :, plan.suffix - read :].reshape(1, k * read, -1)  # [1, k*R, d]
    segment = Segment(allowed, prefix, None, plan.suffix, facts.prefix_visible)
    return segment, x, state.position_ids(decoder, k, facts.last_rows_only)


def _with_own_keys(
    decoder: DecoderMap, layer: int, active: Sequence[tuple[FoldState, LayerFacts]], segments: Sequence[Segment]
) -> list[Segment]:
    """The top layer: keys/values of every row of the jobs that compute only their last rows, in one call."""
    jobs = [(i, state, facts) for i, (state, facts) in enumerate(active) if facts.last_rows_only]
    x = torch.cat([state.hidden[: facts.active].reshape(1, -1, state.hidden.shape[-1]) for _, state, facts in jobs], dim=1)
    pos = torch.cat([state.position_ids(decoder, facts.active, False) for _, state, facts in jobs], dim=-1)
    keys, values = decoder.layer_key_values(layer, x, pos, decoder.rotary(x, pos))  # [1, kv_heads, rows, head_dim]
    out, offset = list(segments), 0
    for i, state, facts in jobs:
        rows = facts.active * state.plan.suffix
        own = (keys[:, :, offset : offset + rows], values[:, :, offset : offset + rows])
        out[i] = Segment(out[i].allowed, out[i].prefix, own, out[i].suffix, out[i].prefix_visible)
        offset += rows
    return out


def finish_folds(states: Sequence[FoldState]) -> list[torch.Tensor | SampleError]:
    """After the loop: read each job's flags once, and its last-position states in the caller's order."""
    results: list[torch.Tensor | SampleError] = []
    for state in states:
        plan = state.plan
        if bool(state.broken_promise):
            raise RuntimeError("shared-prefix attention was told the prefix is fully visible, but its mask blocks prefix keys")
        if bool(state.empty_row):
            results.append(_empty_row_error(plan))
            continue
        n_var = len(plan.variants)
        device = state.hidden.device
        caller_order = torch.empty(n_var, dtype=torch.long, device=device)
        caller_order[torch.tensor(plan.order, device=device)] = torch.arange(n_var, device=device)
        # [V, R, d_model]: the rows are permuted here, before the unembedding, not the [V, R, vocab] logits after it.
        results.append(state.hidden[caller_order, -plan.read_rows :])
    return results


def _empty_row_error(plan: FoldPlan) -> SampleError:
    """The error of a plan whose masks left a row with no key (found again on the host, with its position)."""
    try:
        for _ in plan.steps():
            pass
    except SampleError as exc:
        return exc
    raise RuntimeError("a fold's device check found a query row with no key, but its host masks have none")
