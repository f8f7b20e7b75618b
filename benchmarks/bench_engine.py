"""Reference path vs fast engine on a LLaVA-1.5-shaped sequence, same inputs, same run.

Shape: 576 image tokens (336 px view, 14 px patches), the paper's vicuna_v1 prompt around a GQA
question (~50 text tokens with the offline SentencePiece-style tokenizer), 32 decoder layers; the
width is scaled down for CPU (``--hidden``). Weights are random: the cost of a forward does not
depend on the weights' values.

Both paths compute the six paper flows at every window centre for one sample; the script checks
they agree and prints the times and their ratio.

    python benchmarks/bench_engine.py                 # 32 layers, hidden 256
    python benchmarks/bench_engine.py --quick         # 8 layers, smaller: a smoke test
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from PIL import Image

from vlmflow.data.sample import Box, Sample, SceneObject, TaskType
from vlmflow.experiments.prepare import prepare_sample
from vlmflow.experiments.windows import sweep
from vlmflow.knockout.fast import clean_run, fast_logits
from vlmflow.knockout.reference import reference_logits
from vlmflow.knockout.spec import Knockout
from vlmflow.positions.groups import PAPER_FLOWS
from vlmflow.testing.tiny import TinyLlavaConfig, build_tiny_llava, loaded_from_objects


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--window", type=int, default=7)
    parser.add_argument("--attn", default="sdpa", choices=["sdpa", "eager"])
    parser.add_argument("--repeats", type=int, default=3, help="timed repetitions of the fast path")
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

    with torch.no_grad():
        start = time.perf_counter()
        ref = reference_logits(loaded.model, loaded.adapter, prepared.encoded, knockouts)
        t_ref = time.perf_counter() - start

        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            clean = clean_run(loaded.model, loaded.adapter, prepared.encoded, capture_from=min(k.first_target for k in knockouts))
            fast = fast_logits(loaded.model, loaded.adapter, prepared.encoded, clean, knockouts)
            times.append(time.perf_counter() - start)
    t_fast = statistics.median(times)
    diff = (torch.log_softmax(fast, -1) - torch.log_softmax(ref, -1)).abs().max().item()
    print(f"reference (one full forward per knockout): {t_ref:8.2f} s")
    print(f"fast (clean run + folded suffix):          {t_fast:8.2f} s  (median of {args.repeats})")
    print(f"speed-up: {t_ref / t_fast:.1f}x   max |log p| difference: {diff:.2e}")


if __name__ == "__main__":
    main()
