"""The analytic limit: decoder work of the paper's procedure vs. the least any exact method must do.

Unit: one **token-layer**, one sequence position through one decoder layer (its projections and
MLP; attention scores are not counted, they are a few percent of a layer at the real widths). The
vision tower and projector are counted in the same unit by their multiply-adds:
``vision_equivalent = (image_tokens + 1) * vision_layers * vision_macs_per_token / decoder_macs_per_token``
plus the projector, about 4-5% of a LLaVA-1.5 prefill.

For one sample with ``n`` positions, ``L`` layers, ``m`` greedy answer tokens, ``F`` flows and a
window sweep of ``W = L`` windows, **the paper's procedure** (per flow: one greedy ``generate``,
then one full ``generate(max_new_tokens=1)`` per window, each with the vision tower) costs

    baseline = F * [ (1 + W) * (n*L + vision) + (m - 1) * L ].

**The minimum** any exact method must compute is one clean pass (the baseline answer and its
probability; every knockout reads its keys/values and hidden states) plus, per knockout, what
really differs from work already done:

* positions before the first target ``t0`` never change (causal attention);
* layers below the window's first layer ``a`` never change;
* in the first changed layer only the target rows change: a non-target row reads keys/values
  computed from that layer's (still unchanged) inputs through an unchanged mask row;
* from the next layer on every row ``>= t0`` changes (it reads the targets' changed keys);
* in the last layer only the last row's output is read; the other rows are needed only for their
  keys/values, ``f_kv`` of a token-layer (``2 * d_model * d_kv`` of the layer's multiply-adds);
* windows with the same first layer (the clipped ones at the bottom) agree up to the end of the
  shorter window, so the longer one changes only from there on (again target rows first).

    clean   = (n - 1) * (L - 1 + f_kv) + L + (m - 1) * L + vision
    minimum = clean + sum over flows and windows of the knockout terms above
    limit   = baseline / minimum

``vlmflow`` reports what the fast engine schedules: the clean pass at full length plus, per
knockout, all suffix rows ``n - t0`` from the layer where it starts (its window's first layer, or
where it first differs from a window with the same first layer) up to the last layer but one, and
in the last layer the last row plus the other rows' query/key/value projections (``f_qkv``).

**Attention scores** are left out of the token-layer unit. At the real widths that is a few per
cent; at the reduced CPU widths it is not (one key costs ``2 * d_model`` multiply-adds of a row's
scores and weighted sum, against a token-layer's ``layer_macs``). :attr:`Work.attention_limit` is the
same ratio with them counted, as each side computes them: a causal prefill row (the clean pass, the
baseline's greedy ``generate``, and the baseline's window calls outside the window, where the model
gets no mask and the kernel skips the causal half) scores ``(n + 1) / 2`` keys on average; a row in
the window's layers of a baseline window call all ``n`` (the hooked dense mask cannot be skipped); a
recomputed suffix row about ``n``. Every exact method recomputes rows that score all keys, while most
of the baseline's rows score half, so at narrow widths this ratio is below the token-layer limit:
it is what the reduced CPU widths allow.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class DecoderDims:
    """What the work model needs of a decoder and vision tower."""

    hidden: int
    heads: int
    kv_heads: int
    intermediate: int
    vision_tokens: int  # vision tower positions (image tokens + CLS)
    vision_layers: int
    vision_hidden: int
    vision_intermediate: int

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    @property
    def layer_macs(self) -> int:
        """Multiply-adds of one token through one decoder layer (projections + gated MLP)."""
        d, dq, dkv = self.hidden, self.heads * self.head_dim, self.kv_heads * self.head_dim
        return d * (2 * dq + 2 * dkv) + 3 * d * self.intermediate

    @property
    def f_qkv(self) -> float:
        """Share of a token-layer spent on the query, key and value projections."""
        return self.hidden * (self.heads + 2 * self.kv_heads) * self.head_dim / self.layer_macs

    @property
    def score_share(self) -> float:
        """Attention-score multiply-adds per key of one row, as a share of a token-layer."""
        return 2 * self.heads * self.head_dim / self.layer_macs

    @property
    def f_kv(self) -> float:
        """Share of a token-layer spent on the key/value projections."""
        return 2 * self.hidden * self.kv_heads * self.head_dim / self.layer_macs

    @property
    def vision_equivalent(self) -> float:
        """One vision tower + projector pass, in decoder token-layers."""
        dv = self.vision_hidden
        tower = self.vision_tokens * self.vision_layers * (4 * dv * dv + 2 * dv * self.vision_intermediate)
        projector = (self.vision_tokens - 1) * (dv * self.hidden + self.hidden * self.hidden)
        return (tower + projector) / self.layer_macs


@dataclass(frozen=True)
class FlowPlan:
    """One flow of a sample: its target positions, and the ``(first, last)`` layer of each window."""

    name: str
    targets: tuple[int, ...]
    windows: tuple[tuple[int, int], ...]


@dataclass(frozen=True)
class Work:
    """Token-layers of the paper's procedure, of the minimum, and of vlmflow's schedule."""

    baseline: float
    minimum: float
    vlmflow: float
    attention_limit: float = 0.0  # baseline / minimum with the attention scores counted

    @property
    def limit(self) -> float:
        return self.baseline / self.minimum


def knockout_minimum(targets: Sequence[int], windows: Sequence[tuple[int, int]], n: int, n_layers: int, f_kv: float) -> float:
    """Least token-layers to recompute for one flow's windows (see the module docstring).

    >>> knockout_minimum([9], [(0, 1), (0, 2), (1, 3)], n=10, n_layers=4, f_kv=0.2)  # one row: L - start
    9.0
    """
    suffix = n - min(targets)
    last_is_target = (n - 1) in targets
    return sum(_rows_from(b, len(targets), suffix, last_is_target, n_layers, f_kv) for b in _branch_layers(windows))


def knockout_scheduled(targets: Sequence[int], windows: Sequence[tuple[int, int]], n: int, n_layers: int, f_qkv: float) -> float:
    """Token-layers the fast engine computes for one flow's windows (see the module docstring).

    >>> knockout_scheduled([9], [(0, 1), (0, 2), (1, 3)], n=10, n_layers=4, f_qkv=0.3)  # one row
    9.0
    """
    suffix = n - min(targets)
    total = 0.0
    for branch in _branch_layers(windows):
        for layer in range(branch, n_layers):
            top = layer == n_layers - 1 and suffix > 1
            total += 1.0 + f_qkv * (suffix - 1) if top else suffix
    return total


def _branch_layers(windows: Sequence[tuple[int, int]]) -> list[int]:
    """Per window (grouped by first layer), the layer where it first differs from work already done:
    its first layer, or one past the end of the previous (shorter) window with the same first layer.

    >>> _branch_layers([(0, 0), (0, 1), (2, 3)])
    [0, 1, 2]
    """
    by_start: dict[int, list[int]] = defaultdict(list)
    for first, last in windows:
        by_start[first].append(last)
    branches = []
    for first, ends in by_start.items():
        branch = first
        for end in sorted(ends):
            branches.append(branch)
            branch = end + 1
    return branches


def _rows_from(branch: int, n_targets: int, suffix: int, last_is_target: bool, n_layers: int, f_kv: float) -> float:
    """Token-layers from layer ``branch`` up, when only the targets change in ``branch`` itself."""
    if branch >= n_layers:
        return 0.0
    total = 0.0
    for layer in range(branch, n_layers):
        changed = n_targets if layer == branch else suffix
        last_changed = last_is_target if layer == branch else True
        if layer == n_layers - 1:  # only the last row's output is read; the others give keys/values
            total += 1.0 + f_kv * (changed - 1) if last_changed else 0.0
        else:
            total += changed
    return total


def work(
    dims: DecoderDims,
    n: int,
    n_layers: int,
    new_tokens: int,
    flows: Sequence[FlowPlan],
) -> Work:
    """Token-layer work of one sample under the paper's procedure, the minimum, and vlmflow."""
    vision = dims.vision_equivalent
    decode = (new_tokens - 1) * n_layers
    prefill = n * n_layers + vision
    baseline = sum((1 + len(f.windows)) * prefill + decode for f in flows)
    clean_min = (n - 1) * (n_layers - 1 + dims.f_kv) + n_layers + decode + vision
    knockouts = sum(knockout_minimum(f.targets, f.windows, n, n_layers, dims.f_kv) for f in flows)
    minimum = clean_min + knockouts
    scheduled = prefill + decode + sum(knockout_scheduled(f.targets, f.windows, n, n_layers, dims.f_qkv) for f in flows)
    # With the scores: a causal prefill row reads (n + 1) / 2 keys on average; a row in a window call's
    # masked layers (the window's) and a recomputed row read n.
    causal_row, full_row = 1 + dims.score_share * (n + 1) / 2, 1 + dims.score_share * n

    def window_call(first: int, last: int) -> float:
        masked = last - first + 1
        return n * (masked * full_row + (n_layers - masked) * causal_row)

    baseline_macs = sum(causal_row * (n * n_layers) + decode + sum(window_call(*w) for w in f.windows) for f in flows)
    baseline_macs += vision * sum(1 + len(f.windows) for f in flows)
    attention_limit = baseline_macs / ((clean_min - vision) * causal_row + vision + knockouts * full_row)
    return Work(baseline=baseline, minimum=minimum, vlmflow=scheduled, attention_limit=attention_limit)
