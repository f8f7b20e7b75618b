"""Soak: a few hundred samples through the real runner, RSS sampled after each; memory must not grow.

    python benchmarks/soak.py --samples 300                  # a tiny random LLaVA built on the fly
    python benchmarks/soak.py --samples 300 --model organism # the packaged trained organism
    python benchmarks/soak.py --samples 300 --model PATH --csv rss.csv

Prints RSS after the first sample, after the warm-up, at the end and at the peak, the growth after
the warm-up and the fitted slope (KiB per sample); exits with status 1 when the growth exceeds
``--max-growth-mib``. ``--csv`` writes the per-sample RSS.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from importlib import resources
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the soak harness lives with the tests

from support.soak import run_soak  # noqa: E402
from vlmflow.experiments.flows import FlowSettings  # noqa: E402
from vlmflow.tiny.llava import TinyLlavaConfig, build_tiny_llava  # noqa: E402


def _organism() -> Path:
    path = Path(str(resources.files("vlmflow").joinpath("resources", "organism")))
    if not (path / "config.json").is_file():
        sys.exit("the trained organism is not in this checkout (vlmflow/resources/organism has no config.json)")
    return path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=300)
    parser.add_argument("--model", default=None, help="checkpoint directory, or 'organism' (default: a tiny random LLaVA)")
    parser.add_argument("--warmup", type=int, default=20, help="samples before growth is measured")
    parser.add_argument("--engine", default="fast", choices=("fast", "reference"))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--max-growth-mib", type=float, default=16.0)
    parser.add_argument("--csv", type=Path, default=None, help="write sample,rss_mib here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="vlmflow-soak-") as tmp:
        if args.model is None:
            model: str | Path = Path(tmp) / "tiny"
            build_tiny_llava(TinyLlavaConfig(), model)
        else:
            model = _organism() if args.model == "organism" else args.model
        settings = FlowSettings(keep_all=True, engine=args.engine)
        result = run_soak(model, args.samples, Path(tmp) / "soak", warmup=args.warmup, settings=settings)
    print(f"model: {args.model or 'tiny random LLaVA (default TinyLlavaConfig)'}; engine {args.engine}; threads {args.threads}")
    print(f"run: {result.summary['samples']} samples, {result.summary['errors']} errors, {result.summary['flow_rows']} flow rows")
    print(result.report())
    if args.csv is not None:
        lines = ["sample,rss_mib"] + [f"{i + 1},{r / 2**20:.3f}" for i, r in enumerate(result.rss)]
        args.csv.write_text("\n".join(lines) + "\n")
        print(f"per-sample RSS written to {args.csv}")
    if result.growth_mib > args.max_growth_mib:
        print(f"FAIL: memory grew by {result.growth_mib:.2f} MiB after the warm-up (limit {args.max_growth_mib} MiB)")
        return 1
    print("OK: no memory growth beyond the limit")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
