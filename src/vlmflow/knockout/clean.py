"""The clean run: one unmodified pass (and greedy answer) that keeps what the fast engine needs.

Per layer it keeps the hidden states entering the layer at the positions a knockout may change
(from ``capture_from`` on) and the keys/values of every position; the lens reads the same hidden
states. The vision tower runs once, here.

Several samples run together (:func:`clean_runs`): their prompts are right-padded into one batch
(:mod:`vlmflow.knockout.padded`: no real query reads a padding key), so every decoder layer is one
call for all of them. The layers are run by vlmflow (:meth:`DecoderMap.run_layer
<vlmflow.adapters.decoder.DecoderMap.run_layer>`, the same calls the fast engine's folds make),
and the answer is decoded greedily over the cache without ``generate``: each step feeds every
sample's last token, until each has produced a stop token or ``max_new_tokens`` tokens.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass

import torch

from vlmflow.adapters.additions import ResidualAdditions
from vlmflow.adapters.decoder import DecoderMap
from vlmflow.adapters.pattern import AttentionPattern
from vlmflow.inputs import Encoded
from vlmflow.knockout.mask import to_kernel_mask
from vlmflow.knockout.padded import PaddedKV, decode_mask, pad_positions, pad_rows, prompt_mask
from vlmflow.knockout.precision import final_logits

__all__ = ["CleanRun", "clean_run", "clean_runs", "stop_ids_of"]


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
        generated: greedy answer token ids (``[new_tokens]``, the stop token included when one was
            produced), when generation was asked for.
        additions: what the model adds to its hidden states between decoder layers (DeepStack),
            ``None`` for a plain stack of layers; the fast engine adds the same to recomputed rows.
        row_logits: ``[R, vocab]`` float32 logits of the last ``R`` positions, when the run was asked
            to keep ``read_rows=R > 1`` (a teacher-forced answer); ``logits`` is their last row.
    """

    logits: torch.Tensor
    start: int
    hidden: list[torch.Tensor]
    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    generated: torch.Tensor | None = None
    additions: ResidualAdditions | None = None
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


def stop_ids_of(eos_token_id: int | Sequence[int] | None) -> frozenset[int]:
    """The stop token ids of an ``eos_token_id`` setting (one id, several, or none).

    >>> sorted(stop_ids_of([2, 32000])), stop_ids_of(None)
    ([2, 32000], frozenset())
    """
    if eos_token_id is None:
        return frozenset()
    if isinstance(eos_token_id, int):
        return frozenset({eos_token_id})
    return frozenset(int(i) for i in eos_token_id)


@torch.no_grad()
def clean_run(
    decoder: DecoderMap,
    encoded: Encoded,
    *,
    capture_from: int,
    max_new_tokens: int = 0,
    eos_token_id: int | Sequence[int] | None = None,
    read_rows: int = 1,
) -> CleanRun:
    """One clean prefill (plus greedy decoding when ``max_new_tokens > 0``, stopping at ``eos_token_id``)
    that keeps, per layer, the hidden states at positions ``>= capture_from`` and the keys/values of
    all positions: :func:`clean_runs` for one sample. ``read_rows=R > 1`` also keeps the logits of the
    last ``R`` positions (``row_logits``; only without generation).

    >>> clean = clean_run(decoder, encoded, capture_from=40, max_new_tokens=12)   # doctest: +SKIP
    >>> clean.hidden[0].shape                                                     # doctest: +SKIP
    torch.Size([22, 4096])
    """
    return clean_runs(
        decoder,
        [encoded],
        capture_from=[capture_from],
        max_new_tokens=max_new_tokens,
        stop_ids=stop_ids_of(eos_token_id),
        read_rows=read_rows,
    )[0]


@torch.no_grad()
def clean_runs(
    decoder: DecoderMap,
    encodeds: Sequence[Encoded],
    *,
    capture_from: Sequence[int],
    max_new_tokens: int = 0,
    stop_ids: Collection[int] = (),
    read_rows: int | Sequence[int] = 1,
) -> list[CleanRun]:
    """The clean runs of several samples, computed together: one call per decoder layer for all of them.

    Each sample's result is the one it gets alone (its prompt's queries never read another's keys
    or a padding key); ``capture_from[b]`` is sample ``b``'s first kept position. With
    ``max_new_tokens > 0`` each sample's answer is decoded greedily until it produces a token in
    ``stop_ids`` or reaches ``max_new_tokens`` tokens. ``read_rows`` ``R > 1`` (one for all, or one per sample) also keeps
    the logits of each sample's last ``R`` positions (``row_logits``; only without generation).

    >>> runs = clean_runs(decoder, [a, b], capture_from=[600, 590], max_new_tokens=3)   # doctest: +SKIP
    >>> [run.generated.tolist() for run in runs]                                       # doctest: +SKIP
    [[3308, 2], [7933, 2]]
    """
    if len(encodeds) != len(capture_from) or not encodeds:
        raise ValueError(f"clean_runs needs one capture_from per sample, got {len(capture_from)} for {len(encodeds)} samples")
    lengths = [e.seq_len for e in encodeds]
    reads = [read_rows] * len(encodeds) if isinstance(read_rows, int) else list(read_rows)
    for start, n, read in zip(capture_from, lengths, reads, strict=True):
        if not 0 <= start < n:
            raise ValueError(f"capture_from {start} is outside the prompt's {n} positions")
        if read != 1 and (max_new_tokens > 0 or not 1 <= read <= n):
            raise ValueError(f"read_rows must be 1..{n} and needs max_new_tokens=0, got {read} with {max_new_tokens}")
    n_max, extra = max(lengths), max(0, max_new_tokens - 1)
    device, impl, dtype = decoder.device, decoder.attention_implementation, decoder.dtype
    positions = [decoder.position_ids(e) for e in encodeds]  # [..., 1, n_b]
    patterns = [decoder.attention_pattern(e) for e in encodeds]
    embedded, additions = [], []
    for e in encodeds:
        # The model's own forward up to layer 0 also hands its language model what it adds between
        # layers (DeepStack); it is recorded here and added in the loop below, as the model does.
        with decoder.recording_additions() as recorded:
            embedded.append(decoder.input_embeddings(e)[0])  # [n_b, d]
        additions.append(recorded())
    hidden = pad_rows(embedded, n_max)  # [B, n_max, d]
    pos = pad_positions(positions, n_max)  # [..., B, n_max]
    rotary = decoder.rotary(hidden, pos)
    cache = PaddedKV(n_max + extra)
    kept: list[list[torch.Tensor]] = [[] for _ in encodeds]
    # Plain causal patterns are the same in every layer: one mask serves them all.
    same_everywhere = all(p.is_causal for p in patterns)
    mask = None
    for layer in range(decoder.n_layers):
        for b, (start, n) in enumerate(zip(capture_from, lengths, strict=True)):
            kept[b].append(hidden[b, start:n].clone())  # [n_b - start, d]
        if mask is None or not same_everywhere:
            mask = to_kernel_mask(prompt_mask(patterns, layer, lengths, n_max, device), impl, dtype)
        hidden = decoder.run_layer(layer, hidden, mask, pos, rotary, cache)
        for b, (added, n) in enumerate(zip(additions, lengths, strict=True)):
            if added is not None:
                hidden[b, :n] = added.after_layer(layer, hidden[b, :n], torch.arange(n, device=hidden.device))
    for b, (start, n) in enumerate(zip(capture_from, lengths, strict=True)):
        kept[b].append(hidden[b, start:n].clone())
    last = torch.stack([hidden[b, n - 1] for b, n in enumerate(lengths)])  # [B, d]
    logits = final_logits(decoder, last)  # [B, vocab]
    generated = _greedy(decoder, logits, cache, positions, patterns, lengths, max_new_tokens, frozenset(stop_ids))
    return [
        CleanRun(
            logits=logits[b],
            start=capture_from[b],
            hidden=kept[b],
            keys=[cache.keys[layer][b : b + 1, :, :n] for layer in range(decoder.n_layers)],
            values=[cache.values[layer][b : b + 1, :, :n] for layer in range(decoder.n_layers)],
            generated=generated[b],
            additions=additions[b],
            # [R, vocab] logits of the last R positions (one row: it is `logits`)
            row_logits=final_logits(decoder, hidden[b, n - reads[b] : n]) if reads[b] > 1 else None,
        )
        for b, n in enumerate(lengths)
    ]


def _greedy(
    decoder: DecoderMap,
    logits: torch.Tensor,
    cache: PaddedKV,
    positions: Sequence[torch.Tensor],
    patterns: Sequence[AttentionPattern],
    lengths: Sequence[int],
    max_new_tokens: int,
    stop_ids: frozenset[int],
) -> list[torch.Tensor | None]:
    """Greedy answers ``[tokens]`` per sample from the prefill's last-position ``logits [B, vocab]``.

    Generated token ``g`` of every sample goes to cache column ``n_max + g`` with position id
    :meth:`~vlmflow.adapters.decoder.DecoderMap.next_positions` ``[g]`` of its sample. A sample that
    has stopped keeps being fed (the batch keeps its shape) but its tokens are no longer recorded.
    """
    if max_new_tokens <= 0:
        return [None] * len(lengths)
    n_max, extra = max(lengths), max_new_tokens - 1
    device, impl, dtype = decoder.device, decoder.attention_implementation, decoder.dtype
    token = logits.argmax(-1)  # [B]
    answers = [[t] for t in token.tolist()]
    done = [a[0] in stop_ids for a in answers]
    following = [decoder.next_positions(p, extra) for p in positions]  # [..., 1, extra] each
    extended = [p.extended(n + extra) for p, n in zip(patterns, lengths, strict=True)]
    same_everywhere = all(p.is_causal for p in patterns)
    for g in range(extra):
        if all(done):
            break
        x = decoder.embed_tokens(token[:, None].to(device))  # [B, 1, d]
        pos = torch.cat([f[..., g : g + 1] for f in following], dim=-2)  # [..., B, 1]
        rotary = decoder.rotary(x, pos)
        mask = None
        for layer in range(decoder.n_layers):
            if mask is None or not same_everywhere:
                mask = to_kernel_mask(decode_mask(extended, layer, lengths, n_max, g, device), impl, dtype)
            x = decoder.run_layer(layer, x, mask, pos, rotary, cache)
        token = final_logits(decoder, x[:, -1]).argmax(-1)
        for b, t in enumerate(token.tolist()):
            if not done[b]:
                answers[b].append(t)
                done[b] = t in stop_ids
    return [torch.tensor(a) for a in answers]
