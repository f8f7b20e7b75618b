"""The attention of one folded layer call, three ways: which is fastest on this device?

A fold of ``k`` variants of one sample (``S`` suffix rows each, shared clean prefix of ``t0`` keys),
at a real model's head shape, with the masks of an image->question window (the question rows may
not read the image keys in half of the variants), attended

* ``dense``: torch's sdpa over ``[prefix ; every variant's keys]`` with the dense block-diagonal mask
  (what the model's kernel does under :class:`~vlmflow.knockout.strategy.DenseFold`);
* ``merged``: vlmflow's shared-prefix attention with explicit products (the accelerator path's
  fallback): the prefix once for all rows, the own keys per variant, two parts merged by
  log-sum-exp, float32 scores and softmax;
* ``merged-fused``: the same with each part through a fused kernel that returns the log-sum-exp
  (CUDA: the memory-efficient kernel, :class:`~vlmflow.knockout.strategy.AcceleratorFold`'s choice
  once checked on the device; CPU: the flash kernel, :class:`~vlmflow.knockout.strategy.SharedPrefixFold`);
* ``flex`` (``--flex``): FlexAttention with a block mask over the dense layout, compiled.

Each result is checked against ``dense`` (float32 reference). Times are the median of ``--reps``
calls: CUDA events on a GPU, process CPU seconds on CPU (one thread).

    python benchmarks/bench_fold_attention.py --flex                           # CPU, 7B heads, S=31, k=34
    python benchmarks/bench_fold_attention.py --device cuda --dtype bfloat16 --flex
    python benchmarks/bench_fold_attention.py --shape next --device cuda --dtype bfloat16 --flex
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn

from vlmflow.knockout import fused_kernels as fk
from vlmflow.knockout import prefix_attention as pa
from vlmflow.knockout.strategy import compact_mask, dense_mask

#: (query heads, key/value heads, prefix t0) of the paper's shapes (head_dim 128).
SHAPES = {"llava15": (32, 32, 603), "next": (32, 8, 2331), "13b": (40, 40, 603)}


def fold_inputs(shape: str, suffix: int, k: int, device: str, dtype: torch.dtype, seed: int = 0) -> dict:
    """Queries, prefix/own keys and the allowed masks of one ->question fold."""
    heads, kv_heads, t0 = SHAPES[shape]
    gen = torch.Generator(device="cpu").manual_seed(seed)

    def randn(*size: int) -> torch.Tensor:
        return torch.randn(*size, generator=gen).to(device=device, dtype=dtype)

    image = slice(5, t0 - 20)  # the image block inside the prefix
    allowed = torch.ones(k, 1, suffix, t0 + suffix, dtype=torch.bool)
    allowed[:, :, :, t0:] = torch.ones(suffix, suffix, dtype=torch.bool).tril()  # causal among own keys
    allowed[: k // 2, :, :, image] = False  # the variants whose window is open here
    return {
        "query": randn(1, heads, k * suffix, 128),
        "prefix": (randn(1, kv_heads, t0, 128), randn(1, kv_heads, t0, 128)),
        "own": (randn(1, kv_heads, k * suffix, 128), randn(1, kv_heads, k * suffix, 128)),
        "allowed": allowed.to(device),
        "t0": t0,
        "suffix": suffix,
    }


def dense(f: dict) -> torch.Tensor:
    keys = torch.cat([f["prefix"][0], f["own"][0]], dim=2)
    values = torch.cat([f["prefix"][1], f["own"][1]], dim=2)
    mask = dense_mask(f["allowed"], f["t0"], f["suffix"])
    out = torch.nn.functional.scaled_dot_product_attention(f["query"], keys, values, attn_mask=mask, enable_gqa=True)
    return out.transpose(1, 2)[0]


def merged(f: dict, fused: bool | None) -> torch.Tensor:
    part = pa.FoldPart(f["t0"], f["suffix"], f["prefix"], compact_mask(f["allowed"]))
    call = pa.FoldCall(parts=(part,), fused=fused, check_promise=False)
    out, _ = pa.shared_prefix_attention_forward(nn.Module().eval(), f["query"], *f["own"], None, vlmflow_fold=call)
    return out[0]


def flex_function(f: dict) -> Callable[[], torch.Tensor]:
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    keys = torch.cat([f["prefix"][0], f["own"][0]], dim=2)
    values = torch.cat([f["prefix"][1], f["own"][1]], dim=2)
    allowed = dense_mask(f["allowed"], f["t0"], f["suffix"])[0, 0]  # [rows, t0 + k*S]

    def mask_mod(b, h, q, kv):  # noqa: ANN001, ANN202 - FlexAttention's signature
        return allowed[q, kv]

    rows, width = allowed.shape
    block = create_block_mask(mask_mod, None, None, rows, width, device=str(allowed.device))
    compiled = torch.compile(flex_attention)
    return lambda: compiled(f["query"], keys, values, block_mask=block, enable_gqa=True).transpose(1, 2)[0]


def timed(function: Callable[[], torch.Tensor], device: str, reps: int) -> float:
    """Median milliseconds of ``reps`` calls (after one warm-up call)."""
    function()
    times = []
    for _ in range(reps):
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            function()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t = time.process_time()
            function()
            times.append(1000 * (time.process_time() - t))
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="llava15", choices=sorted(SHAPES))
    parser.add_argument("--suffix", type=int, default=31, help="rows per variant (question + prompt end)")
    parser.add_argument("--variants", type=int, default=34, help="variants in the fold (1024 query rows / 31)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--flex", action="store_true", help="also FlexAttention with a block mask (compiled)")
    args = parser.parse_args()
    torch.set_num_threads(1) if args.device == "cpu" else None
    dtype = getattr(torch, args.dtype)
    f = fold_inputs(args.shape, args.suffix, args.variants, args.device, dtype)
    reference = dense({**f, "query": f["query"].float(), "prefix": tuple(x.float() for x in f["prefix"]), "own": tuple(x.float() for x in f["own"])})
    ways: dict[str, Callable[[], torch.Tensor]] = {"dense": lambda: dense(f), "merged": lambda: merged(f, fused=False)}
    if args.device == "cpu" or fk.efficient_attention_works(args.device, dtype, 128):
        ways["merged-fused"] = lambda: merged(f, fused=True if args.device == "cpu" else None)
    else:
        print("merged-fused: CUDA's memory-efficient kernel did not pass its check on this device (see the log)")
    if args.flex:
        try:
            ways["flex"] = flex_function(f)
        except Exception as exc:  # noqa: BLE001 - report what this torch build cannot do, measure the rest
            print(f"flex: unavailable ({type(exc).__name__}: {str(exc).splitlines()[0][:120]})")
    heads, kv_heads, t0 = SHAPES[args.shape]
    print(
        f"{args.shape}: {heads} heads ({kv_heads} KV), prefix {t0}, {args.variants} variants x {args.suffix} rows, "
        f"{args.dtype} on {args.device}; {'CUDA events' if args.device == 'cuda' else 'process CPU'} ms per call"
    )
    with torch.no_grad():
        for name, function in ways.items():
            try:
                error = (function().float() - reference).abs().max().item()
                ms = timed(function, args.device, args.reps)
            except Exception as exc:  # noqa: BLE001
                print(f"  {name:<13}failed: {type(exc).__name__}: {str(exc).splitlines()[0][:120]}")
                continue
            print(f"  {name:<13}{ms:9.2f} ms   max |difference| from float32 dense {error:.1e}")


if __name__ == "__main__":
    main()
