"""Attention masks in the format each attention kernel takes, and the safety checks on them.

Convention: ``allowed`` is a bool tensor, True where a query may attend to a key. ``sdpa`` takes it
as is; ``eager`` needs an additive float mask (a bool mask would be *added* as 0/1 and silently
ignored — one of the peer tools' bugs), so it becomes ``0`` / ``finfo(dtype).min``.
"""

from __future__ import annotations

import torch

from vlmflow.errors import ConfigError, SampleError


def to_kernel_mask(allowed: torch.Tensor, implementation: str, dtype: torch.dtype) -> torch.Tensor:
    """Convert a bool ``allowed`` mask ``[batch, head|1, query, key]`` for ``implementation``.

    >>> to_kernel_mask(torch.tensor([[[[True, False]]]]), "eager", torch.float32).tolist()
    [[[[0.0, -3.4028234663852886e+38]]]]
    """
    if allowed.dtype != torch.bool:
        raise TypeError(f"allowed mask must be bool, got {allowed.dtype}")
    if implementation == "sdpa":
        return allowed
    if implementation == "eager":
        mask = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
        return mask.masked_fill_(~allowed, torch.finfo(dtype).min)
    raise ConfigError(f"cannot build a knockout mask for attention implementation {implementation!r}; valid: eager, sdpa")


def check_no_empty_rows(allowed: torch.Tensor, rows: torch.Tensor | None = None) -> None:
    """Raise :class:`SampleError` if some query row may attend to no key at all.

    Such a row has no defined attention output (sdpa returns zeros for a bool mask and the mean of
    the values for a float one), so a knockout that empties a row is refused rather than computed.
    """
    empty = ~any_last(allowed)
    if bool(empty.any()):
        where = torch.nonzero(empty)[0].tolist()
        row = where[-1]
        position = int(rows[row]) if rows is not None else row
        raise SampleError(
            f"the knockout leaves query position {position} with no key to attend to; "
            "block fewer sources (a position must keep at least one visible key)",
            stage="knockout",
        )


def any_last(mask: torch.Tensor) -> torch.Tensor:
    """``mask.any(-1)`` for a bool mask, computed as a byte maximum (several times faster on CPU).

    >>> any_last(torch.tensor([[True, False], [False, False]])).tolist()
    [True, False]
    """
    return mask.view(torch.uint8).amax(-1).bool()
