"""Float32 attention scores and logits from half-precision weights, without float32 copies of the weights.

With bfloat16 weights a product rounded to bfloat16 keeps about three significant digits: a logit
of 20 comes back as a multiple of 0.125, which moves a log-probability by up to 0.06. The engines
therefore take attention scores, softmax and logits in float32. On CUDA the matrix products read
the half-precision operands and accumulate and return float32 (``out_dtype``, one kernel, no
float32 copy of a weight); where a device cannot do that the operands are converted first (float32
models need neither).

>>> a, b = torch.ones(2, 3, 4, dtype=torch.bfloat16), torch.ones(2, 4, 5, dtype=torch.bfloat16)
>>> float32_bmm(a, b).dtype, float32_bmm(a, b)[0, 0, 0].item()
(torch.float32, 4.0)
"""

from __future__ import annotations

from functools import cache

import torch

from vlmflow.adapters.decoder import DecoderMap

__all__ = ["final_logits", "float32_bmm", "float32_linear", "out_dtype_supported"]


@cache
def out_dtype_supported(device_type: str, dtype: torch.dtype) -> bool:
    """Whether ``torch.bmm(..., out_dtype=torch.float32)`` runs for ``dtype`` operands on this device type.

    >>> out_dtype_supported("cpu", torch.float32)
    False
    """
    if dtype == torch.float32 or device_type == "meta":
        return False
    try:
        a = torch.ones(1, 2, 2, dtype=dtype, device=device_type)
        torch.bmm(a, a, out_dtype=torch.float32)
    except (RuntimeError, NotImplementedError, TypeError):
        return False
    return True


def float32_bmm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a [B, M, K] @ b [B, K, N]`` accumulated and returned in float32 (see the module docstring)."""
    if a.dtype == torch.float32 and b.dtype == torch.float32:
        return torch.bmm(a, b)
    if a.dtype == b.dtype and out_dtype_supported(a.device.type, a.dtype):
        return torch.bmm(a, b, out_dtype=torch.float32)
    return torch.bmm(a.float(), b.float())


def float32_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x [..., K] @ weight[N, K].T (+ bias)`` in float32 (see the module docstring).

    >>> float32_linear(torch.ones(3, 2, dtype=torch.bfloat16), torch.ones(4, 2, dtype=torch.bfloat16)).shape
    torch.Size([3, 4])
    """
    if x.dtype == torch.float32 and weight.dtype == torch.float32:
        return torch.nn.functional.linear(x, weight, bias)
    if x.dtype == weight.dtype and out_dtype_supported(x.device.type, x.dtype):
        out = torch.bmm(x.reshape(1, -1, x.shape[-1]), weight.t()[None], out_dtype=torch.float32)
        out = out.view(*x.shape[:-1], weight.shape[0])
    else:
        out = torch.nn.functional.linear(x.float(), weight.float())
    return out if bias is None else out + bias.float()


def final_logits(decoder: DecoderMap, hidden: torch.Tensor) -> torch.Tensor:
    """Float32 logits ``[..., vocab]`` of final hidden states ``[..., d_model]``: the final norm, then
    the unembedding accumulated in float32 (:func:`float32_linear`).

    >>> final_logits(decoder, last_hidden).dtype        # doctest: +SKIP
    torch.float32
    """
    normed = decoder.final_norm(hidden)
    head = decoder.unembed
    if isinstance(head, torch.nn.Linear):
        return float32_linear(normed, head.weight, head.bias)
    return head(normed).float()
