"""Reference path vs fast engine on a LLaVA-1.5-shaped sequence, same inputs, same run.

Shape: 576 image tokens (336 px view, 14 px patches), the paper's vicuna_v1 prompt around a GQA
question (46 text tokens with the offline SentencePiece-style tokenizer), 32 decoder layers; the
width is scaled down for CPU (``--hidden``). Weights are random: the cost of a forward does not
depend on the weights' values.

Both paths compute the six paper flows at every window centre for one sample (6 x 32 = 192
knockouts); the script checks they agree and prints the times and their ratio. Every timing is the
median of ``--repeats`` runs, as wall-clock and as process CPU time (the CPU time is the steadier
of the two on a machine shared with other jobs).

The reference path costs the same full forward for every knockout, so on a slow machine it can be
timed on an evenly spread subset (``--reference-subset N``) and scaled to all knockouts; the output
says when it was.

    python benchmarks/bench_engine.py                          # 32 layers, hidden 256, full reference
    python benchmarks/bench_engine.py --reference-subset 24    # same, reference timed on 24 knockouts
    python benchmarks/bench_engine.py --quick                  # 8 layers, smaller: a smoke test
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from PIL import Image

from vlmflow.data.sample import Box, Sample, SceneObject, TaskType
from vlmflow.experiments.prepare import prepare_sample
from vlmflow.experiments.windows import sweep
from vlmflow.knockout.fast import clean_run, fast_logits
from vlmflow.knockout.reference import reference_logits
from vlmflow.knockout.spec import Knockout
from vlmflow.positions.groups import PAPER_FLOWS
from vlmflow.tiny.llava import TinyLlavaConfig, build_tiny_llava, loaded_from_objects


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--window", type=int, default=7)
    parser.add_argument("--attn", default="sdpa", choices=["sdpa", "eager"])
    parser.add_argument("--repeats", type=int, default=3, help="timed repetitions of each path (median reported)")
    parser.add_argument(
        "--reference-subset", type=int, default=0, help="time the reference on N evenly spread knockouts and scale (0: all)"
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="8 layers, hidden 128: finishes in seconds")
    args = parser.parse_args()
    if args.quick:
        args.layers, args.hidden, args.heads = 8, 128, 4
    torch.set_num_threads(args.threads)

    config = TinyLlavaConfig(
        tokenizer="sentencepiece",
        layers=args.layers,
        hidden=args.hidden,
        heads=args.heads,
        kv_heads=args.heads,
        intermediate=args.hidden * 11 // 4,
        image_size=336,
        patch_size=14,
        vision_layers=1,
        vision_hidden=64,
        attn_implementation=args.attn,
    )
    model, processor = build_tiny_llava(config)
    loaded = loaded_from_objects(model, processor)
    image = Image.new("RGB", (500, 375), (90, 120, 60))
    sample = Sample(
        "bench", "img", "Is the jar full or empty?", "empty", task=TaskType.CHOOSE_ATTR,
        true_option="empty", false_option="full",
        objects=(SceneObject("jar", "1", Box(253, 291, 60, 105)),), image_size=(500, 375),
    )
    prepared = prepare_sample(loaded, sample, image)
    g = prepared.groups
    knockouts = [Knockout.for_flows(g, [flow], layers) for flow in PAPER_FLOWS for _, layers in sweep(args.window, args.layers)]
    n_text = prepared.encoded.seq_len - len(g["image"])
    print(
        f"sequence: {prepared.encoded.seq_len} tokens ({len(g['image'])} image, {n_text} text), "
        f"{args.layers} layers x {args.hidden} wide, {args.attn}; {len(knockouts)} knockouts "
        f"(6 flows x {args.layers} windows of {args.window})"
    )

    subset = knockouts
    if 0 < args.reference_subset < len(knockouts):
        step = len(knockouts) / args.reference_subset
        subset = [knockouts[int(i * step)] for i in range(args.reference_subset)]
    capture_from = min(k.first_target for k in knockouts)

    def run_reference() -> torch.Tensor:
        return reference_logits(loaded.decoder, prepared.encoded, subset)

    def run_fast() -> torch.Tensor:
        clean = clean_run(loaded.decoder, prepared.encoded, capture_from=capture_from)
        return fast_logits(loaded.decoder, prepared.encoded, clean, knockouts)

    with torch.no_grad():
        ref, ref_wall, ref_cpu = timed(run_reference, args.repeats)
        fast, fast_wall, fast_cpu = timed(run_fast, args.repeats)
    scale = len(knockouts) / len(subset)
    chosen = [knockouts.index(k) for k in subset]
    diff = (torch.log_softmax(fast[chosen], -1) - torch.log_softmax(ref, -1)).abs().max().item()
    how = "" if scale == 1 else f" (timed on {len(subset)} of {len(knockouts)} knockouts, scaled x{scale:.1f})"
    print(f"timings: median of {args.repeats} repeats each; wall-clock / process CPU seconds")
    print(f"reference (one full forward per knockout): {ref_wall * scale:8.2f} s wall  {ref_cpu * scale:8.2f} s cpu{how}")
    print(f"fast (clean run + folded suffix):          {fast_wall:8.2f} s wall  {fast_cpu:8.2f} s cpu")
    print(
        f"speed-up: {ref_wall * scale / fast_wall:.1f}x wall, {ref_cpu * scale / fast_cpu:.1f}x cpu   "
        f"max |log p| difference: {diff:.2e}"
    )


def timed(fn: Callable[[], torch.Tensor], repeats: int) -> tuple[torch.Tensor, float, float]:
    """``fn()``'s result and the median wall-clock and process-CPU seconds over ``repeats`` calls."""
    walls, cpus = [], []
    result = torch.empty(0)
    for _ in range(repeats):
        wall, cpu = time.perf_counter(), time.process_time()
        result = fn()
        walls.append(time.perf_counter() - wall)
        cpus.append(time.process_time() - cpu)
    return result, statistics.median(walls), statistics.median(cpus)

if __name__ == "__main__":
    main()
