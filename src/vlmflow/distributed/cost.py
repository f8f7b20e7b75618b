"""How long a grid of runs takes on N GPUs, from a measured per-sample time.

The model (see docs/scale-out.md for the derivation): the runs of one model are executed one after
the other on N replicas that load the model once; inside a run, shards are handed to whichever
replica is free (greedy list scheduling). For a run of ``q`` samples at ``t`` seconds per sample
(all flows of a sample, on one GPU) cut into shards of ``s`` samples, Graham's bound gives the
run's wall time as at most ``q*t/N + (1 - 1/N)*s*t``. A model adds its load time ``L`` once, and
the models run one after the other::

    T(N) = sum over models m of [ L_m + sum over tasks k of ( q_k*t_m/N + (1 - 1/N)*s_k*t_m ) ]

with ``s_k`` the executor's default shard size for ``q_k`` samples on ``N`` replicas. Dropping the
tail terms gives the lower bound (perfect balance). Everything else (opening and consolidating run
directories, progress polling) is seconds per run and ignored.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from vlmflow.distributed.cluster import shard_size_for
from vlmflow.errors import ConfigError

#: Questions per task in the paper's released GQA files (ChooseAttr, ChooseCat, ChooseRel,
#: CompareAttr, LogicalObj, QueryAttr): 5525 in all.
PAPER_TASK_SIZES: tuple[int, ...] = (1000, 1000, 964, 570, 991, 1000)


@dataclass(frozen=True)
class ModelCost:
    """One model of the grid: seconds per sample on one GPU (all flows) and seconds to load it.

    >>> ModelCost("llava-1.5-7b", seconds_per_sample=1.0).load_seconds
    60.0
    """

    name: str
    seconds_per_sample: float
    load_seconds: float = 60.0

    def __post_init__(self) -> None:
        if self.seconds_per_sample <= 0 or self.load_seconds < 0:
            raise ConfigError(
                f"model {self.name!r}: seconds_per_sample must be > 0 and load_seconds >= 0, "
                f"got {self.seconds_per_sample} and {self.load_seconds}"
            )


def run_seconds(samples: int, seconds_per_sample: float, gpus: int, shard_size: int | None = None) -> float:
    """Upper bound of one run's wall time on ``gpus`` replicas (Graham's list-scheduling bound).

    >>> run_seconds(1000, 1.0, 8)          # 125 s of work per GPU + a tail of at most 7/8 of a shard
    153.0
    >>> run_seconds(1000, 1.0, 1)
    1000.0
    """
    if gpus < 1:
        raise ConfigError(f"gpus must be >= 1, got {gpus}")
    size = shard_size_for(samples, gpus, shard_size)
    return samples * seconds_per_sample / gpus + (1 - 1 / gpus) * size * seconds_per_sample


def grid_seconds(
    models: Sequence[ModelCost],
    gpus: int,
    task_sizes: Sequence[int] = PAPER_TASK_SIZES,
    shard_size: int | None = None,
    *,
    balanced: bool = False,
) -> float:
    """Wall time of every (model, task) run on ``gpus`` GPUs, models one after the other.

    An upper bound; ``balanced=True`` gives the lower bound (no shard tail at the end of a run).

    >>> grid_seconds([ModelCost("m", 1.0, load_seconds=0.0)], 1, task_sizes=[100, 50])
    150.0
    >>> grid_seconds([ModelCost("m", 1.0, load_seconds=10.0)], 2, task_sizes=[100], balanced=True)
    60.0
    """
    total = 0.0
    for model in models:
        total += model.load_seconds
        for q in task_sizes:
            if balanced:
                total += q * model.seconds_per_sample / gpus
            else:
                total += run_seconds(q, model.seconds_per_sample, gpus, shard_size)
    return total


def paper_models(seconds_per_sample_7b: float, load_seconds_7b: float = 60.0) -> tuple[ModelCost, ...]:
    """The paper's four models, scaled from LLaVA-1.5-7b's per-sample time.

    The ratios are *assumptions* until each model is benchmarked: 13b about 2x (40 layers, twice
    the parameters); LLaVA-1.6 and LLaVA-NeXT-8b about 4.5x (about 2,300 instead of 650 tokens).

    >>> [round(m.seconds_per_sample, 1) for m in paper_models(1.0)]
    [1.0, 2.0, 4.5, 4.5]
    """
    ratios = (
        ("llava-1.5-7b", 1.0, 1.0),
        ("llava-1.5-13b", 2.0, 2.0),
        ("llava-1.6-vicuna-7b", 4.5, 1.0),
        ("llama3-llava-next-8b", 4.5, 1.1),
    )  # (name, time ratio, load-time ratio)
    return tuple(
        ModelCost(name, seconds_per_sample_7b * ratio, load_seconds_7b * load) for name, ratio, load in ratios
    )


def grid_table(
    seconds_per_sample_7b: Sequence[float], gpus: Sequence[int], load_seconds_7b: float = 60.0
) -> list[list[str]]:
    """Rows of grid hours (paper grid, :func:`paper_models`): lower and upper bound per GPU count.

    >>> grid_table([1.0], [1, 8])[1]
    ['1 s', '18.5 h', '2.4-2.9 h']
    """
    header = ["LLaVA-1.5-7b s/sample", *[f"{n} GPU" + ("s" if n > 1 else "") for n in gpus]]
    rows = [header]
    for t in seconds_per_sample_7b:
        models = paper_models(t, load_seconds_7b)
        cells = []
        for n in gpus:
            low, high = (f"{grid_seconds(models, n, balanced=b) / 3600:.1f}" for b in (True, False))
            cells.append(f"{high} h" if low == high else f"{low}-{high} h")
        rows.append([f"{t:g} s", *cells])
    return rows


def grid_markdown(
    seconds_per_sample_7b: Sequence[float] = (0.25, 0.5, 1.0, 2.0, 4.0, 10.0),
    gpus: Sequence[int] = (1, 8, 16, 32, 64),
    load_seconds_7b: float = 60.0,
) -> str:
    """:func:`grid_table` as a Markdown table (the one in docs/scale-out.md).

    >>> print(grid_markdown([1.0], [8]))
    | LLaVA-1.5-7b s/sample | 8 GPUs |
    | --- | --- |
    | 1 s | 2.4-2.9 h |
    """
    rows = grid_table(seconds_per_sample_7b, gpus, load_seconds_7b)
    lines = ["| " + " | ".join(rows[0]) + " |", "|" + " --- |" * len(rows[0])]
    lines += ["| " + " | ".join(row) + " |" for row in rows[1:]]
    return "\n".join(lines)
