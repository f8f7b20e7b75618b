"""Fused attention kernels that also return the log-sum-exp, for the shared-prefix attention's parts.

The shared-prefix attention (:mod:`vlmflow.knockout.prefix_attention`) merges two softmax parts
exactly, so each part needs its log-sum-exp next to its output. torch's public
``scaled_dot_product_attention`` does not return it; two of its fused kernels do:

* on CPU, ``_scaled_dot_product_flash_attention_for_cpu`` (takes a float mask);
* on CUDA, ``_scaled_dot_product_efficient_attention`` (memory-efficient attention: takes an
  additive bias, reads the keys once per block of query rows and never materialises the scores).

Both are torch-internal operators, so they are used behind a uniform signature (:data:`Kernel`)
and, on CUDA, only after :func:`efficient_attention_works` has compared the kernel with explicit
float32 products on a small random case on that device and dtype (once per process); where it
fails or disagrees the explicit products are used instead, and the reason is logged.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from functools import cache

import torch

__all__ = ["Kernel", "cpu_flash", "cuda_efficient", "efficient_attention_works", "fused_kernel"]

log = logging.getLogger(__name__)

#: ``(q [1, H, M, D], k [1, H, N, D], v [1, H, N, D], bias [1, H|1, M, N] | None, scale) ->
#: (out [1, H, M, D], lse [1, H, M])``; a row with no visible key may come back with any output
#: and log-sum-exp (the caller masks them).
Kernel = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None, float], tuple[torch.Tensor, torch.Tensor]]

#: The memory-efficient kernel reads the bias with its row stride a multiple of this many elements.
BIAS_ALIGNMENT = 16


def cpu_flash(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """torch's fused CPU flash kernel (see :data:`Kernel`)."""
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, False, attn_mask=bias, scale=scale)[:2]
    return out, lse


def cuda_efficient(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """torch's memory-efficient CUDA kernel (see :data:`Kernel`).

    The bias is copied into a buffer whose rows are padded to :data:`BIAS_ALIGNMENT` elements and
    handed over as a view of the first ``N`` columns (as torch's own sdpa does); a bias shared by
    all heads stays shared (a stride-0 head axis). The kernel's log-sum-exp has its rows padded to
    a multiple of 32; the first ``M`` are returned.
    """
    if bias is not None:
        width = -(-bias.shape[-1] // BIAS_ALIGNMENT) * BIAS_ALIGNMENT
        padded = bias.new_zeros(*bias.shape[:-1], width)
        padded[..., : bias.shape[-1]] = bias
        bias = padded[..., : bias.shape[-1]].expand(q.shape[0], q.shape[1], q.shape[2], bias.shape[-1])
    out, lse = _efficient_op()(q.contiguous(), k.contiguous(), v.contiguous(), bias, True, 0.0, False, scale=scale)[:2]
    return out, lse[..., : q.shape[2]]


def _efficient_op() -> Callable:
    """torch's memory-efficient attention operator (a function, so tests can stand in for it off CUDA)."""
    return torch.ops.aten._scaled_dot_product_efficient_attention


def _explicit(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Float32 reference of :data:`Kernel` (the probe's yardstick)."""
    scores = (q.float() @ k.float().transpose(-1, -2)) * scale
    if bias is not None:
        scores = scores + bias.float()
    lse = torch.logsumexp(scores, -1)
    return torch.softmax(scores, -1) @ v.float(), lse


@cache
def efficient_attention_works(device: str, dtype: torch.dtype, dim: int) -> bool:
    """Whether :func:`cuda_efficient` gives explicit float32 attention's output and log-sum-exp on
    ``device`` for ``dtype`` keys of head size ``dim`` (a small random case with a mask that hides
    keys, whole rows of keys and a shared bias; compared once per process)."""
    if not device.startswith("cuda") or not hasattr(torch.ops.aten, "_scaled_dot_product_efficient_attention"):
        return False
    try:
        gen = torch.Generator(device="cpu").manual_seed(0)
        q, k, v = (torch.randn(1, 2, rows, dim, generator=gen).to(device, dtype) for rows in (37, 50, 50))
        allowed = torch.rand(1, 1, 37, 50, generator=gen) > 0.3
        allowed[..., 0] = True
        bias = torch.zeros(allowed.shape, dtype=dtype).masked_fill_(~allowed, float("-inf")).to(device)
        tolerance = 1e-4 if dtype == torch.float32 else 3e-2
        for b in (bias, None):
            out, lse = cuda_efficient(q, k, v, b, 0.1)
            ref_out, ref_lse = _explicit(q, k, v, b, 0.1)
            if not (torch.allclose(out.float(), ref_out, atol=tolerance) and torch.allclose(lse.float(), ref_lse, atol=tolerance)):
                log.warning("CUDA memory-efficient attention disagrees with explicit products on %s (%s): not used", device, dtype)
                return False
    except (RuntimeError, TypeError, NotImplementedError) as exc:
        log.warning("CUDA memory-efficient attention with log-sum-exp is not usable on %s (%s): %s", device, dtype, exc)
        return False
    return True


def fused_kernel(q: torch.Tensor, fused: bool | None) -> Kernel | None:
    """The fused kernel for queries ``q`` (``None``: explicit products).

    ``fused`` ``True``: the device's fused kernel (CPU flash on CPU); ``None``: the fused kernel only
    on CUDA (where it is checked first); ``False``: none. On CUDA the kernel is used only when
    :func:`efficient_attention_works` for this device, dtype and head size.

    >>> fused_kernel(torch.zeros(1, 1, 2, 8), None) is None
    True
    """
    if fused is False:
        return None
    if q.device.type == "cpu":
        return cpu_flash if fused and hasattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu") else None
    if q.device.type == "cuda" and efficient_attention_works(str(q.device), q.dtype, q.shape[-1]):
        return cuda_efficient
    return None
