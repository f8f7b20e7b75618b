"""The clean run: one unmodified forward (and greedy answer) that keeps what the fast engine needs.

Per layer it keeps the hidden states entering the layer at the positions a knockout may change
(from ``capture_from`` on) and the keys/values of every position; the lens reads the same hidden
states. The vision tower runs once, here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from vlmflow.adapters.decoder import DecoderMap
from vlmflow.inputs import Encoded


@dataclass
class CleanRun:
    """What one clean forward leaves for the fast engine and the metrics.

    Attributes:
        logits: ``[vocab]`` float32 last-position logits of the clean model.
        start: first position whose per-layer hidden states were kept.
        hidden: per layer ``l``, the hidden states entering layer ``l`` at positions ``start..n-1``:
            ``[n - start, d_model]``; ``hidden[L]`` is the last layer's output (before the final norm).
        keys / values: per layer, the clean post-RoPE keys/values of positions ``0..n-1``:
            ``[1, kv_heads, n, head_dim]``.
        generated: greedy answer token ids (``[new_tokens]``), when generation was asked for.
        row_logits: ``[R, vocab]`` float32 logits of the last ``R`` positions, when the run was asked
            to keep ``read_rows=R > 1`` (a teacher-forced answer); ``logits`` is their last row.
    """

    logits: torch.Tensor
    start: int
    hidden: list[torch.Tensor]
    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    generated: torch.Tensor | None = None
    row_logits: torch.Tensor | None = None

    def read_rows_logits(self, rows: int) -> torch.Tensor:
        """The clean logits of the last ``rows`` positions, ``[rows, vocab]``.

        Raises:
            ValueError: the clean run kept fewer rows.
        """
        kept = self.logits[None] if self.row_logits is None else self.row_logits
        if rows > kept.shape[0]:
            raise ValueError(f"the clean run kept the logits of {kept.shape[0]} rows, {rows} are asked for (clean_run(read_rows=...))")
        return kept[kept.shape[0] - rows :]


@torch.no_grad()
def clean_run(
    decoder: DecoderMap,
    encoded: Encoded,
    *,
    capture_from: int,
    max_new_tokens: int = 0,
    eos_token_id: int | list[int] | None = None,
    pad_token_id: int | None = None,
    read_rows: int = 1,
) -> CleanRun:
    """One clean prefill (plus greedy decoding when ``max_new_tokens > 0``) that keeps, per layer,
    the hidden states at positions ``>= capture_from`` and the keys/values of all positions.

    Forward pre-hooks on the decoder layers read the layer inputs during the prefill only; they are
    removed in ``finally``. ``read_rows=R > 1`` also keeps the logits of the last ``R`` positions
    (``row_logits``; only without generation).

    >>> clean = clean_run(decoder, encoded, capture_from=40, max_new_tokens=12)   # doctest: +SKIP
    >>> clean.hidden[0].shape                                                     # doctest: +SKIP
    torch.Size([22, 4096])
    """
    from transformers import DynamicCache

    model = decoder.model
    n = encoded.seq_len
    if read_rows != 1 and (max_new_tokens > 0 or not 1 <= read_rows <= n):
        raise ValueError(f"read_rows must be 1..{n} and needs max_new_tokens=0, got {read_rows} with {max_new_tokens}")
    captured: dict[int, torch.Tensor] = {}
    handles = []
    # Layer inputs 0..L-1 come from the decoder layers; the final norm's input is layer L's output.
    hooked = [*decoder.layers, decoder.final_norm]

    def make_hook(index: int) -> Any:
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            hidden = args[0] if args else kwargs["hidden_states"]
            if index not in captured and hidden.shape[-2] == n:
                captured[index] = hidden[0, capture_from:].detach().clone()  # [n - start, d_model]

        return hook

    # A plain cache keeps every position's keys/values in every layer (a config-built one would keep
    # only the last window of a sliding-window layer); windows are applied by the attention mask.
    cache = DynamicCache()
    row_logits: torch.Tensor | None = None
    try:
        for index, module in enumerate(hooked):
            handles.append(module.register_forward_pre_hook(make_hook(index), with_kwargs=True))
        if max_new_tokens > 0:
            out = model.generate(
                **encoded.inputs,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                num_beams=1,
                eos_token_id=eos_token_id,
                pad_token_id=pad_token_id if pad_token_id is not None else eos_token_id,
                cache=cache,
                return_dict_in_generate=True,
                output_logits=True,
            )
            logits = out.logits[0][0].float()
            generated = out.sequences[0, n:].cpu()
        else:
            out = model(**encoded.inputs, cache=cache, use_cache=True, logits_to_keep=read_rows)
            row_logits = out.logits[0, -read_rows:].float()  # [R, vocab]
            logits = row_logits[-1]
            generated = None
    finally:
        for handle in handles:
            handle.remove()
    if len(captured) != len(hooked):
        raise RuntimeError(f"captured hidden states at {len(captured)} of {len(hooked)} layer boundaries during the prefill")
    n_layers = decoder.n_layers
    keys = [cache.layers[i].keys[..., :n, :] for i in range(n_layers)]
    values = [cache.layers[i].values[..., :n, :] for i in range(n_layers)]
    return CleanRun(
        logits=logits,
        start=capture_from,
        hidden=[captured[i] for i in range(len(hooked))],
        keys=keys,
        values=values,
        generated=generated,
        row_logits=row_logits if read_rows > 1 else None,  # one row: it is `logits`
    )
