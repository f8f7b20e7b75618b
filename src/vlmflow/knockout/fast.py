"""The fast, exact knockout engine.

Why it is exact: a knockout changes attention only at its target rows, from its first blocked layer
``a`` on. From there a change spreads to every position that attends to a changed position in a
later layer. Let ``t`` be the **first affected position**: the earliest position that can see a
changed position, directly or through later layers, in the clean model's attention pattern
(:class:`~vlmflow.adapters.pattern.AttentionPattern`, layers ``>= a``). Nothing at positions
``< t`` and nothing below layer ``a`` changes, so the result is determined by

* the clean keys/values of positions ``< t`` in every layer (unchanged), and
* the clean hidden states of positions ``>= t`` entering layer ``a`` (unchanged),

and only the suffix ``t..n-1`` has to be recomputed, from layer ``a`` up. For causal attention
``t`` is the first target position; where earlier positions may attend to later ones (a
bidirectional image block, a prefix-LM) :func:`affected_starts` moves ``t`` back as far as needed,
so the same engine stays exact for every family. One clean forward (:mod:`vlmflow.knockout.clean`:
vision tower once, baseline logits, greedy answer) provides both.

Many knockouts (all windows of all flows with the same ``t``) run together "folded" into the query
axis of one batch row. How is planned as a pure value (:mod:`vlmflow.knockout.plan`: order, start
layers, branches, per-layer masks, which rows each layer computes); a short executor
(:mod:`vlmflow.knockout.executor`) runs the plan through the attention strategy chosen once per
call (:mod:`vlmflow.knockout.strategy`).

Module-level ablations (:class:`~vlmflow.knockout.ablation.Ablation`) obey the same rule (nothing
changes before their first affected position or below their first layer) and run folded next to
knockouts: their replacements are applied to their own query rows by
:func:`~vlmflow.knockout.ablation.folded_ablation`.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Sequence

import torch

from vlmflow.adapters.decoder import DecoderMap
from vlmflow.adapters.pattern import AttentionPattern
from vlmflow.inputs import Encoded
from vlmflow.knockout.ablation import Ablation, AblationValues, check_ablations, replacement_values
from vlmflow.knockout.clean import CleanRun, clean_run
from vlmflow.knockout.executor import run_fold
from vlmflow.knockout.plan import Intervention, plan_fold
from vlmflow.knockout.spec import Knockout, check_layers
from vlmflow.knockout.strategy import FoldAttention, choose_strategy

__all__ = ["DEFAULT_FOLD_QUERIES", "CleanRun", "affected_starts", "clean_run", "fast_logits", "release_cached_memory"]

log = logging.getLogger(__name__)

#: Default bound on query rows per folded layer call (keeps [query, key] score matrices small).
DEFAULT_FOLD_QUERIES = 1024


@torch.no_grad()
def fast_logits(
    decoder: DecoderMap,
    encoded: Encoded,
    clean: CleanRun,
    knockouts: Sequence[Intervention],
    *,
    max_fold_queries: int = DEFAULT_FOLD_QUERIES,
    strategy: FoldAttention | None = None,
    rows: int | None = None,
) -> torch.Tensor:
    """Last-position logits ``[len(knockouts), vocab]`` (float32) under each knockout, exactly.

    ``rows=R`` reads the last ``R`` positions instead: ``[len(knockouts), R, vocab]`` (the logits of
    a teacher-forced answer of ``R`` tokens appended to the prompt). A position before a knockout's
    first affected position keeps its clean logits, taken from ``clean.row_logits`` (the clean run
    must have kept ``R`` rows: ``clean_run(..., read_rows=R)``).

    Knockouts (and ablations) with the same first affected position (:func:`affected_starts`) run
    folded together; ``max_fold_queries`` bounds the query rows of one layer call (more variants
    are split into chunks of similar start layer). Mean ablations cost one extra clean forward for
    their replacement values. On ``torch.OutOfMemoryError`` the chunk size is halved and the chunk
    retried, down to one variant per call; an OOM with a single variant is raised. ``strategy``:
    the fold's attention (default: :func:`~vlmflow.knockout.strategy.choose_strategy`).

    >>> logits = fast_logits(decoder, encoded, clean, knockouts)   # doctest: +SKIP
    >>> logits.shape                                               # doctest: +SKIP
    torch.Size([192, 32064])
    """
    decoder.check_attention_backend()
    n_layers = decoder.n_layers
    check_layers([k for k in knockouts if isinstance(k, Knockout)], n_layers, decoder.n_heads)
    ablation_index = [i for i, k in enumerate(knockouts) if isinstance(k, Ablation)]
    check_ablations([knockouts[i] for i in ablation_index], n_layers, encoded.seq_len)
    values = dict(
        zip(ablation_index, replacement_values(decoder, encoded, [knockouts[i] for i in ablation_index]), strict=True)
    )
    pattern = decoder.attention_pattern(encoded)
    strategy = strategy or choose_strategy(decoder)
    vocab = clean.logits.shape[-1]
    n = encoded.seq_len
    read = 1 if rows is None else rows
    if not 1 <= read <= n:
        raise ValueError(f"rows must be 1..{n} (the sequence length), got {rows}")
    clean_rows = clean.logits[None] if rows is None else clean.read_rows_logits(read)  # [R, vocab]
    result = torch.empty(len(knockouts), read, vocab, dtype=torch.float32)
    starts = affected_starts(pattern, n_layers, n, knockouts)
    by_start: dict[int, list[int]] = defaultdict(list)
    for index, knockout in enumerate(knockouts):
        if knockout.is_empty:
            result[index] = clean_rows.cpu()
        else:
            by_start[starts[index]].append(index)
    with strategy.session(decoder):
        for t0, indices in by_start.items():
            if t0 < clean.start:
                raise ValueError(
                    f"clean run kept hidden states from position {clean.start}, but a knockout can change position "
                    f"{t0} (use affected_starts() to choose capture_from)"
                )
            # Rows before t0 are untouched by these knockouts: their clean logits.
            untouched = max(0, read - (n - t0))
            if untouched:
                result[indices, :untouched] = clean_rows[:untouched].cpu()
            view = result[:, untouched:]
            _run_start(decoder, encoded, clean, knockouts, indices, t0, values, pattern, strategy, max_fold_queries, view)
    return result[:, 0] if rows is None else result


def _run_start(
    decoder: DecoderMap,
    encoded: Encoded,
    clean: CleanRun,
    knockouts: Sequence[Intervention],
    indices: list[int],
    t0: int,
    values: dict[int, AblationValues],
    pattern: AttentionPattern,
    strategy: FoldAttention,
    max_fold_queries: int,
    result: torch.Tensor,
) -> None:
    """Fill ``result[indices]`` (``[.., R, vocab]``: the last ``R`` rows): the knockouts starting at ``t0``,
    folded in chunks of at most ``max_fold_queries`` query rows, halving a chunk after an
    out-of-memory error."""
    n = encoded.seq_len
    read = result.shape[1]
    per_call = max(1, max_fold_queries // (n - t0))
    ordered = sorted(indices, key=lambda i: knockouts[i].first_layer)
    lo = 0
    while lo < len(ordered):
        chunk = ordered[lo : lo + per_call]
        plan = plan_fold(
            [knockouts[i] for i in chunk],
            pattern,
            t0=t0,
            n=n,
            n_layers=decoder.n_layers,
            n_heads=decoder.n_heads,
            device=clean.hidden[0].device,
            read_rows=read,
        )
        # Replacement values by folded index (the plan reorders the chunk).
        folded_values = {j: values[chunk[i]] for j, i in enumerate(plan.order) if chunk[i] in values}
        try:
            last = run_fold(plan, decoder, encoded, clean, strategy, folded_values)  # [v, R, d_model]
            logits = decoder.unembed(decoder.final_norm(last)).float()  # [v, R, vocab]
        except torch.OutOfMemoryError:
            if len(chunk) == 1:
                raise  # one variant at a time is the smallest fold; the caller records the sample
            logits = None
        if logits is None:  # outside the except block, so the failed call's tensors are freed
            per_call = max(1, len(chunk) // 2)
            release_cached_memory()
            log.warning("out of memory folding %d knockouts; retrying %d at a time", len(chunk), per_call)
            continue
        result[chunk] = logits.cpu()
        lo += len(chunk)


def release_cached_memory() -> None:
    """Hand cached accelerator memory back after an out-of-memory error (nothing to do on CPU)."""
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


@torch.no_grad()
def affected_starts(
    pattern: AttentionPattern, n_layers: int, n: int, interventions: Sequence[Intervention]
) -> list[int]:
    """Per intervention, the first position whose computation it can change (``-1`` when empty).

    An intervention changes the outputs of its target rows in its first layer ``a``; from layer
    ``a + 1`` on every position that attends to a changed position changes too. The result is the
    largest ``t <= first_target`` such that no position ``< t`` attends to any position ``>= t`` in
    any layer ``> a`` of the clean ``pattern`` (``n`` positions), so positions ``< t`` provably keep
    their clean states. With causal attention this is ``first_target``.

    >>> from vlmflow.adapters.pattern import CausalPattern
    >>> affected_starts(CausalPattern(), 2, 6, [Knockout((((5,), (1,)),), (0,)), Knockout(((( ), (1,)),), (0,))])
    [5, -1]
    """
    if pattern.is_causal:  # no position reads a later one: nothing before the first target can change
        return [-1 if k.is_empty else k.first_target for k in interventions]
    live = [k for k in interventions if not k.is_empty]
    if not live:
        return [-1] * len(interventions)
    t_max = max(k.first_target for k in live)
    first = min(k.first_layer for k in live) + 1  # layers where a change can spread
    rows = torch.arange(t_max)
    keys = torch.arange(n)
    # last_key[l, p]: the last key position row p may attend to in layer l (rows < t_max suffice);
    # row n_layers stands for "no later layer".
    last_key = torch.full((n_layers + 1, t_max), -1, dtype=torch.long)
    for layer in range(first, n_layers if t_max > 0 else first):
        allowed = pattern.allowed(layer, rows, n).cpu()  # [t_max, n]
        last_key[layer] = torch.where(allowed, keys, -1).amax(dim=1)
    reach = last_key.flip(0).cummax(dim=0).values.flip(0)  # reach[l, p]: max over layers >= l
    out = []
    for k in interventions:
        if k.is_empty:
            out.append(-1)
            continue
        r, t = reach[k.first_layer + 1], k.first_target
        while True:
            sees_ahead = torch.nonzero(r[:t] >= t)  # positions before t that read position >= t
            if len(sees_ahead) == 0:
                break
            t = int(sees_ahead[0])
        out.append(t)
    return out
