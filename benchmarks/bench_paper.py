"""vlmflow against the paper's procedure, side by side: time per sample, speed-up, memory, analytic limit.

For each workload (a model shape, see :mod:`workloads`) and each of the paper's six flows, a pair
of measurements is taken back to back, in alternating order: the paper's procedure for one flow
(:mod:`paper_baseline`: one greedy ``generate`` plus one ``generate(max_new_tokens=1)`` per window,
hooks, vision tower every call, batch size 1) and ``vlmflow``'s flow experiment for the same flow
(:func:`vlmflow.experiments.flows.analyse_sample`: one clean pass, folded exact knockouts). Then the
six-flow suite: ``vlmflow`` with all six flows in one call, against the sum of the six baseline
runs of the repetition (the paper runs one process per flow). Ratios are taken pair by pair and
the median over repetitions is reported, with the range.

The baseline is also the correctness oracle: every probability it computes must agree with
``vlmflow``'s (``max |log p| difference``, asserted), and the knockouts must move the output
(``effect``) by much more than that difference.

Each window call of the baseline runs the same full prefill (only mask values differ), so a
subset of window centres is timed per repetition (``--baseline-windows``, a different subset
each repetition) and the flow's time is the baseline ``generate`` plus ``L x`` their mean; with
``--baseline-windows all`` every window runs.

The analytic limit (:mod:`analytic`) is the ratio of token-layer work between the paper's
procedure and the least any exact method must recompute; ``of limit`` is the measured speed-up as
a fraction of it.

With ``--batch-size N`` vlmflow's six-flow suite is also measured on ``N`` samples computed together
(:func:`vlmflow.experiments.batched_flows.analyse_samples`: one clean pass and one fold run for all
of them; the benchmark's sample first, then others of the same task and about the same length), its
time per sample set against the same baseline; the batch's rows of the benchmark's sample are
checked against the baseline too, and against its batch-1 rows.

    python benchmarks/bench_paper.py --quick                      # CPU smoke test (< 3 min): six-flow ratio
    python benchmarks/bench_paper.py --quick --batch-size 4       # the same, batch 1 and batch 4 side by side
    python benchmarks/bench_paper.py                              # CPU, widths / 8, the three workloads
    python benchmarks/bench_paper.py --device cuda --batch-size auto   # GPU: full 7B / 8B / 13B shapes, bfloat16
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import grid  # noqa: E402
from analytic import DecoderDims, FlowPlan, work  # noqa: E402
from measure import Measurement, MiB, cost, environment, measured  # noqa: E402
from paper_baseline import paper_flow  # noqa: E402
from workloads import CPU_DIVISOR, FULL_SHAPES, Shape, build_model, prepare  # noqa: E402

from vlmflow.errors import SampleError  # noqa: E402
from vlmflow.experiments.batched_flows import analyse_samples  # noqa: E402
from vlmflow.experiments.batching import auto_batch_size  # noqa: E402
from vlmflow.experiments.flows import FlowSettings, analyse_sample  # noqa: E402
from vlmflow.experiments.windows import default_window, sweep  # noqa: E402
from vlmflow.positions.groups import PAPER_FLOWS, Flow  # noqa: E402
from vlmflow.results.tables import FlowRow  # noqa: E402

#: Tolerated |log p| difference between the baseline and vlmflow, per dtype.
TOLERANCE = {torch.float32: 1e-3, torch.bfloat16: 0.15, torch.float16: 0.05}


@dataclass
class FlowTimes:
    """Per repetition: the baseline's estimated time, vlmflow's measurement, and the memory peaks.

    Times are process CPU seconds on CPU and wall seconds on CUDA (:func:`measure.cost`).
    """

    baseline: list[float] = field(default_factory=list)
    vlmflow: list[float] = field(default_factory=list)
    ratio: list[float] = field(default_factory=list)
    wall: list[float] = field(default_factory=list)  # vlmflow's wall seconds (suite only)
    baseline_peak: int = 0
    vlmflow_peak: int = 0
    vlmflow_extra: int = 0


@dataclass
class Agreement:
    max_diff: float = 0.0  # max |log p_baseline - log p_vlmflow| over every probability compared
    min_effect: float = math.inf  # per flow, the largest |log p_blocked - log p_base|; the smallest flow's
    compared: int = 0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="LLaVA-1.5 sequence, 16 layers, width / 32, 2 repetitions")
    parser.add_argument("--workloads", default="llava15,next,13b", help=f"comma list of {', '.join(FULL_SHAPES)}")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--dtype", default=None, help="float32 or bfloat16 (default: float32 on CPU, bfloat16 on CUDA)")
    parser.add_argument("--divisor", type=int, default=None, help=f"width divisor (default: {CPU_DIVISOR} on CPU, 1 on CUDA)")
    parser.add_argument("--reps", type=int, default=None, help="paired repetitions per flow (default: 3, 2 with --quick)")
    parser.add_argument("--baseline-windows", default=None, help="window centres timed per flow and repetition, or 'all' (default: 8)")
    parser.add_argument("--new-tokens", type=int, default=3, help="greedy answer tokens (a one-word answer + end of sequence)")
    parser.add_argument(
        "--batch-size", default=None,
        help="also measure vlmflow on N samples computed together (an integer, or 'auto': what the free GPU memory holds)",
    )
    parser.add_argument(
        "--threads", type=int, default=None,
        help="torch CPU threads (default: 1 on CPU, where ratios come from process CPU time and waiting threads "
        "of a multi-threaded run on a busy machine would count as work; torch's choice on CUDA)",
    )
    args = parser.parse_args(argv)
    args.reps = args.reps or (2 if args.quick else 3)
    args.device = torch.device(args.device)
    on_gpu = args.device.type == "cuda"
    args.dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[args.dtype or ("bfloat16" if on_gpu else "float32")]
    args.divisor = args.divisor or (1 if on_gpu else CPU_DIVISOR)
    windows = args.baseline_windows or "8"
    args.baseline_windows = None if windows == "all" else int(windows)
    args.threads = args.threads or (None if on_gpu else 1)
    if args.batch_size not in (None, "auto"):
        args.batch_size = int(args.batch_size)
        if args.batch_size < 2:
            parser.error(f"--batch-size must be 2 or more (batch 1 is always measured) or 'auto', got {args.batch_size}")
    if args.threads:
        torch.set_num_threads(args.threads)
    return args


def shapes(args: argparse.Namespace) -> list[Shape]:
    if args.quick:
        base = FULL_SHAPES["llava15"].scaled(32)
        return [replace(base, name="quick", title="LLaVA-1.5 sequence, 16 layers (quick)", layers=16, window=default_window(16))]
    return [FULL_SHAPES[name.strip()].scaled(args.divisor) for name in args.workloads.split(",")]


def sampled_centres(n_layers: int, count: int | None, rep: int) -> list[int] | None:
    """``count`` evenly spread window centres, shifted by the repetition (``None``: all)."""
    if count is None or count >= n_layers:
        return None
    step = n_layers / count
    shift = (rep * 0.618 * step) % step
    return sorted({int(i * step + shift) % n_layers for i in range(count)})


def dims_of(shape: Shape) -> DecoderDims:
    return DecoderDims(
        hidden=shape.hidden, heads=shape.heads, kv_heads=shape.kv_heads, intermediate=shape.intermediate,
        vision_tokens=shape.image_tokens + 1, vision_layers=shape.vision_layers,
        vision_hidden=shape.vision_hidden, vision_intermediate=shape.vision_intermediate,
    )


def check_agreement(agree: Agreement, flow: Flow, baseline, rows: list[FlowRow]) -> None:
    """Compare one baseline run with vlmflow's rows for the same flow; track the knockouts' effect."""
    by_layer = {r.layer: r for r in rows if r.flow == flow}
    log = math.log
    diffs = [abs(log(baseline.p_base) - log(by_layer[0].p_base))]
    diffs += [abs(log(p) - log(by_layer[c].p_blocked)) for c, p in baseline.rows]
    agree.max_diff = max(agree.max_diff, *diffs)
    agree.compared += len(diffs)
    effect = max(abs(log(r.p_blocked) - log(r.p_base)) for r in by_layer.values())
    agree.min_effect = min(agree.min_effect, effect)


def run_workload(shape: Shape, args: argparse.Namespace) -> dict:
    """Measure one workload; returns what the report prints."""
    loaded = build_model(shape, device=args.device, dtype=args.dtype)
    prepared = prepare(loaded)
    n, n_layers, k = prepared.encoded.seq_len, loaded.n_layers, shape.window
    groups = prepared.groups
    windows = tuple((layers[0], layers[-1]) for _, layers in sweep(k, n_layers))
    plans = {f: FlowPlan(str(f), tuple(groups[f.target]), windows) for f in PAPER_FLOWS}
    dims = dims_of(shape)
    suite_work = work(dims, n, n_layers, args.new_tokens, list(plans.values()))
    flow_work = {f: work(dims, n, n_layers, args.new_tokens, [plans[f]]) for f in PAPER_FLOWS}

    def settings(flows: tuple[Flow, ...]) -> FlowSettings:
        return FlowSettings(flows=flows, window=k, keep_all=True, max_new_tokens=args.new_tokens)

    print(
        f"\n== {shape.title}: {n_layers} layers x {shape.hidden} wide ({shape.heads} heads, {shape.kv_heads} KV), "
        f"{n} positions ({len(groups['image'])} image), window {k}, {args.dtype}, {args.device} ==",
        flush=True,
    )
    batch_size = auto_batch_size(loaded, n) if args.batch_size == "auto" else args.batch_size
    batch = prepare(loaded, batch_size) if batch_size else None
    if batch:
        print(f"batch: {batch_size} samples of {', '.join(str(p.encoded.seq_len) for p in batch)} positions", flush=True)
    # Warm-up (allocator, kernels), not timed.
    analyse_sample(loaded, prepared, settings(PAPER_FLOWS))
    if batch:
        analyse_samples(loaded, batch, settings(PAPER_FLOWS))
    paper_flow(loaded, prepared, PAPER_FLOWS[0], k, max_new_tokens=args.new_tokens, centres=[n_layers // 2])

    times = {f: FlowTimes() for f in PAPER_FLOWS}
    suite = FlowTimes()
    batched = FlowTimes()
    agree = Agreement()
    batch_vs_single = 0.0  # max |log p| difference between the benchmark sample's rows in the batch and alone
    for rep in range(args.reps):
        centres = sampled_centres(n_layers, args.baseline_windows, rep)
        suite_baseline = 0.0
        baselines = {}
        order = PAPER_FLOWS[rep % 6 :] + PAPER_FLOWS[: rep % 6]
        for i, flow in enumerate(order):
            vlm, base = Measurement(), Measurement()
            for step in ((0, 1) if (rep + i) % 2 == 0 else (1, 0)):
                if step == 0:
                    with measured(args.device) as vlm:
                        result = analyse_sample(loaded, prepared, settings((flow,)))
                else:
                    with measured(args.device) as base:
                        res = paper_flow(loaded, prepared, flow, k, max_new_tokens=args.new_tokens, centres=centres)
            check_agreement(agree, flow, res, result.rows)
            baselines[flow] = res
            estimate = cost(
                args.device,
                res.t_generate + n_layers * statistics.fmean(res.t_windows),
                res.c_generate + n_layers * statistics.fmean(res.c_windows),
            )
            t = times[flow]
            t.baseline.append(estimate)
            t.vlmflow.append(vlm.cost(args.device))
            t.ratio.append(estimate / t.vlmflow[-1])
            t.baseline_peak = max(t.baseline_peak, base.peak)
            t.vlmflow_peak, t.vlmflow_extra = max(t.vlmflow_peak, vlm.peak), max(t.vlmflow_extra, vlm.extra)
            suite_baseline += estimate
            suite.baseline_peak = max(suite.baseline_peak, base.peak)
        with measured(args.device) as whole:
            result = analyse_sample(loaded, prepared, settings(PAPER_FLOWS))
        suite.baseline.append(suite_baseline)
        suite.vlmflow.append(whole.cost(args.device))
        suite.ratio.append(suite_baseline / suite.vlmflow[-1])
        suite.wall.append(whole.seconds)
        suite.vlmflow_peak, suite.vlmflow_extra = max(suite.vlmflow_peak, whole.peak), max(suite.vlmflow_extra, whole.extra)
        line = f"  repetition {rep + 1}/{args.reps}: six-flow ratio {suite.ratio[-1]:.1f}x"
        if batch:
            with measured(args.device) as many:
                results = analyse_samples(loaded, batch, settings(PAPER_FLOWS))
            failed = [r for r in results if isinstance(r, SampleError)]
            if failed:
                raise SystemExit(f"a sample of the batch failed: {failed[0]}")
            for flow in PAPER_FLOWS:
                check_agreement(agree, flow, baselines[flow], results[0].rows)
            single = {(r.flow, r.layer): r.p_blocked for r in result.rows}
            batch_vs_single = max(
                batch_vs_single, *(abs(math.log(r.p_blocked) - math.log(single[(r.flow, r.layer)])) for r in results[0].rows)
            )
            per_sample = many.cost(args.device) / len(batch)
            batched.baseline.append(suite_baseline)
            batched.vlmflow.append(per_sample)
            batched.ratio.append(suite_baseline / per_sample)
            batched.wall.append(many.seconds / len(batch))
            batched.vlmflow_peak, batched.vlmflow_extra = max(batched.vlmflow_peak, many.peak), max(batched.vlmflow_extra, many.extra)
            line += f"; batch of {len(batch)}: {batched.ratio[-1]:.1f}x"
        print(line, flush=True)
    tolerance = TOLERANCE[args.dtype]
    if not agree.max_diff <= tolerance or not agree.max_diff < agree.min_effect / 10:
        raise SystemExit(
            f"baseline and vlmflow disagree: max |log p| difference {agree.max_diff:.2e} "
            f"(tolerance {tolerance:.0e}; smallest flow effect {agree.min_effect:.2e})"
        )
    bytes_per = torch.finfo(args.dtype).bits // 8
    kv_row = 2 * n_layers * shape.kv_heads * (shape.hidden // shape.heads) * bytes_per  # K and V, all layers
    per_window_copy = sum(min(plans[f].targets) for f in PAPER_FLOWS) * len(windows) * kv_row
    if batch and not batch_vs_single <= tolerance:
        raise SystemExit(f"the benchmark sample's rows differ between batch {len(batch)} and batch 1 by {batch_vs_single:.2e} in |log p|")
    return {
        "batch": batched if batch else None, "batch_size": len(batch) if batch else None, "batch_vs_single": batch_vs_single,
        "shape": shape, "n": n, "dims": dims, "times": times, "suite": suite, "agree": agree,
        "suite_work": suite_work, "flow_work": flow_work, "tolerance": tolerance,
        "clean_kv": n * kv_row, "per_window_copy": per_window_copy, "centres": args.baseline_windows,
    }


def _median(values: list[float]) -> float:
    return statistics.median(values)


def report(result: dict, args: argparse.Namespace) -> None:
    """Print one workload's table."""
    shape, times, suite = result["shape"], result["times"], result["suite"]
    mem = "GPU max allocated" if args.device.type == "cuda" else "CPU peak RSS"
    clock = "wall seconds" if args.device.type == "cuda" else "process CPU seconds"
    print(
        f"\n{shape.title} ({result['n']} positions, {shape.layers} layers, width {shape.hidden}); "
        f"times = {clock} per sample; memory = {mem} (MiB)"
    )
    header = f"{'flow':<24}{'baseline s':>11}{'vlmflow s':>11}{'ratio':>8}{'range':>14}{'limit':>8}{'of limit':>9}{'mem base':>10}{'mem vlm':>9}"
    print(header)
    print("-" * len(header))
    rows = [(str(f), times[f], result["flow_work"][f]) for f in PAPER_FLOWS] + [("six-flow suite", suite, result["suite_work"])]
    for name, t, w in rows:
        ratio = _median(t.ratio)
        print(
            f"{name:<24}{_median(t.baseline):>11.2f}{_median(t.vlmflow):>11.3f}{ratio:>7.1f}x"
            f"{f'{min(t.ratio):.1f}-{max(t.ratio):.1f}':>14}{w.limit:>7.1f}x{ratio / w.limit:>9.0%}"
            f"{t.baseline_peak / MiB:>10.0f}{t.vlmflow_peak / MiB:>9.0f}"
        )
    w = result["suite_work"]
    agree = result["agree"]
    many = result["batch"]
    if many is not None:
        ratio = _median(many.ratio)
        name = f"six-flow, batch of {result['batch_size']}"
        print(
            f"{name:<24}{_median(many.baseline):>11.2f}{_median(many.vlmflow):>11.3f}{ratio:>7.1f}x"
            f"{f'{min(many.ratio):.1f}-{max(many.ratio):.1f}':>14}{w.limit:>7.1f}x{ratio / w.limit:>9.0%}"
            f"{suite.baseline_peak / MiB:>10.0f}{many.vlmflow_peak / MiB:>9.0f}"
        )
        print(
            f"six-flow ratio side by side: batch 1 {_median(suite.ratio):.1f}x ({_median(suite.ratio) / w.limit:.0%} of the limit) | "
            f"batch {result['batch_size']} {ratio:.1f}x ({ratio / w.limit:.0%}); vlmflow {1 / _median(suite.vlmflow):.3f} -> "
            f"{1 / _median(many.vlmflow):.3f} samples/s; the benchmark sample's rows in the batch agree with batch 1 within "
            f"{result['batch_vs_single']:.1e} (|log p|)"
        )
    print(
        f"six-flow sweep: baseline {1 / _median(suite.baseline):.4f} samples/s, vlmflow {1 / _median(suite.vlmflow):.3f} samples/s "
        f"(from {clock}; vlmflow wall {_median(suite.wall):.2f} s per sample); "
        f"median ratio {_median(suite.ratio):.1f}x over {len(suite.ratio)} repetitions"
    )
    print(
        f"token-layers per sample: baseline {w.baseline:,.0f}, minimum {w.minimum:,.0f}, vlmflow schedules {w.vlmflow:,.0f} "
        f"(analytic limit {w.limit:.1f}x; vlmflow's schedule allows {w.baseline / w.vlmflow:.1f}x)"
    )
    print(
        f"counting attention scores too (at width {shape.hidden} scoring all {result['n']} keys costs "
        f"{result['dims'].score_share * result['n']:.0%} of a row's projections and MLP; recomputed rows and the masked "
        f"layers of the baseline's window calls score all keys, causal rows half): the baseline does "
        f"{w.attention_limit:.1f}x the multiply-adds of the minimum, so {_median(suite.ratio) / w.attention_limit:.0%} "
        f"of that was reached"
    )
    print(
        f"memory: vlmflow suite peak {suite.vlmflow_peak / MiB:.0f} MiB, +{suite.vlmflow_extra / MiB:.0f} MiB over the loaded model; "
        f"clean K/V (one copy) {result['clean_kv'] / MiB:.0f} MiB; a per-window copy of the prefix K/V would need "
        f"{result['per_window_copy'] / MiB:,.0f} MiB"
    )
    timed = "every window" if result["centres"] is None else f"{result['centres']} window centres per flow and repetition, extrapolated"
    print(
        f"oracle: {agree.compared} probabilities agree within {agree.max_diff:.1e} (|log p|; tolerance {result['tolerance']:.0e}); "
        f"smallest flow effect {agree.min_effect:.1e}; baseline timed on {timed}"
    )


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    info = environment(args.device)
    print("; ".join(f"{key}: {value}" for key, value in info.items()))
    print("command: python benchmarks/bench_paper.py " + " ".join(sys.argv[1:] if argv is None else argv))
    results = []
    for shape in shapes(args):
        results.append(run_workload(shape, args))
        report(results[-1], args)
    def summary(r: dict) -> str:
        limit = r["suite_work"].limit
        text = f"{r['shape'].name} six-flow {_median(r['suite'].ratio):.1f}x ({_median(r['suite'].ratio) / limit:.0%} of the {limit:.1f}x limit)"
        if r["batch"] is not None:
            text += f", batch {r['batch_size']} {_median(r['batch'].ratio):.1f}x ({_median(r['batch'].ratio) / limit:.0%})"
        return text

    print("\nsummary: " + "; ".join(summary(r) for r in results))
    if not args.quick:
        per_sample = {
            r["shape"].name: (_median((r["batch"] or r["suite"]).vlmflow), _median(r["suite"].baseline)) for r in results
        }
        grid.report(grid.project(per_sample), "GPU" if args.device.type == "cuda" else "CPU")
        if args.device.type != "cuda":
            print(f"  (this CPU at widths / {args.divisor}, {args.threads} thread(s): a CPU projection, not a GPU measurement)")
    print("load average at the end: " + " ".join(f"{x:.1f}" for x in __import__("os").getloadavg()))


if __name__ == "__main__":
    main()
