"""Answer emergence: the logit-lens readout of the residual stream at the last position (paper §6).

For every layer boundary ``j = 0..L`` the hidden state at a position is projected onto the
vocabulary, and the probability and rank of a few tracked tokens are recorded:

* ``j = 0`` is the embedding output (the input of decoder layer 0), ``j = 1..L-1`` the output of
  decoder layer ``j - 1`` (0-based; the paper's "layer j"), ``j = L`` the output of the last layer.
  These are exactly :attr:`CleanRun.hidden[j] <vlmflow.knockout.fast.CleanRun.hidden>`.
* Readout ``raw`` is the paper's: ``h_j @ W_U^T`` with **no final norm** for ``j < L``; at ``j = L``
  the final norm is applied (Hugging Face's last hidden state is the normed one, and the paper reads
  that). Readout ``normed`` applies the final norm at every ``j`` (the standard logit lens). The
  ``final_norm`` column of every row says which was done. At ``j = L`` both equal the model's own
  output distribution.
* Unembedding is done in float32, like the paper's (its LM head runs in float32 on CPU). For a
  float32 model the ``j = L`` readout is the model's own logits; in bf16/fp16 it differs from the
  model's low-precision logits by rounding only.

Tracked forms (:mod:`vlmflow.experiments.answer_tokens`), each the **first sub-token** of
``tokenizer.encode(word, add_special_tokens=False)``: the gold answer as written (``answer``, lower
case in GQA), the answer capitalised with ``str.capitalize()`` as the paper does (``"TV"`` becomes
``"Tv"``), for choose tasks the false option in both forms, and the token the model actually
generated first (``generated``, whose ``j = L`` probability is the flows' ``p_base``).

Everything is computed from one :class:`~vlmflow.knockout.fast.CleanRun` (the same clean forward
the flow experiment uses): :func:`lens_tables` takes it, so a study that runs flows and the lens
together pays for one forward. Only the kept positions' vectors are projected; nothing else is
stored. The same readout can be taken at every position of chosen groups (e.g. the question
tokens) with ``LensSettings(groups=...)`` (:mod:`vlmflow.experiments.settings`).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from vlmflow.experiments.answer_tokens import FORM_LABELS, Form, TrackedToken, first_subtoken, tracked_tokens
from vlmflow.experiments.attention import attention_rows
from vlmflow.experiments.flows import baseline
from vlmflow.experiments.prepare import PreparedSample
from vlmflow.experiments.settings import FlowSettings, LensSettings, Readout
from vlmflow.knockout.clean import CleanRun
from vlmflow.positions.groups import Group
from vlmflow.results.tables import LensRow, LensTopRow, Row, SampleRow

if TYPE_CHECKING:
    import pandas as pd

    from vlmflow.adapters.decoder import DecoderMap
    from vlmflow.loading import LoadedModel

__all__ = [
    "FORM_LABELS",
    "Form",
    "LensSettings",
    "Readout",
    "ReadoutStats",
    "TrackedToken",
    "first_subtoken",
    "first_top1_layers",
    "lens_sample_tables",
    "lens_states",
    "lens_tables",
    "readout_logits",
    "readout_stats",
    "summarise_lens",
    "tracked_tokens",
]

log = logging.getLogger(__name__)

#: Upper bound on float32 logits held at once (positions x layers x vocab); ~128 MiB.
MAX_LOGIT_ELEMENTS = 1 << 25


def lens_states(clean: CleanRun, positions: Sequence[int]) -> torch.Tensor:
    """Hidden states ``[len(positions), L + 1, d_model]`` at layer boundaries ``j = 0..L``.

    Raises:
        ValueError: a position lies before the first position the clean run kept.
    """
    early = [p for p in positions if p < clean.start]
    if early:
        raise ValueError(f"clean run kept hidden states from position {clean.start}, the lens needs {early}")
    index = torch.as_tensor([p - clean.start for p in positions], dtype=torch.long, device=clean.hidden[0].device)
    return torch.stack([h.index_select(0, index) for h in clean.hidden], dim=1)


def _unembed_float32(unembed: nn.Module, x: torch.Tensor) -> torch.Tensor:
    # A linear head is applied in float32 (the paper's readout); other heads run as the model runs them.
    if isinstance(unembed, nn.Linear):
        bias = None if unembed.bias is None else unembed.bias.float()
        return nn.functional.linear(x.float(), unembed.weight.float(), bias)
    return unembed(x).float()


@torch.no_grad()
def readout_logits(decoder: DecoderMap, states: torch.Tensor, readout: Readout) -> torch.Tensor:
    """Float32 logits ``[..., L + 1, vocab]`` of hidden states ``[..., L + 1, d_model]``.

    ``normed`` applies the final norm at every layer boundary; ``raw`` only at the last one (the
    paper's readout: HF's last hidden state is normed, the others are not).

    >>> logits = readout_logits(decoder, lens_states(clean, [n - 1]), Readout.RAW)  # doctest: +SKIP
    """
    norm = decoder.final_norm
    if readout is Readout.NORMED:
        x = norm(states)
    else:
        x = states.clone()
        x[..., -1, :] = norm(states[..., -1, :])
    return _unembed_float32(decoder.unembed, x)


@dataclass
class ReadoutStats:
    """What is kept of the logits ``[P, L+1, vocab]`` of one readout (CPU tensors).

    Attributes:
        log_prob: ``[P, L+1, T]`` log-probabilities of the ``T`` tracked tokens.
        rank: ``[P, L+1, T]`` ranks of the tracked tokens (1 = top-1).
        top_ids / top_log_prob: ``[P, L+1, k]`` the top-k tokens and their log-probabilities.
        entropy: ``[P, L+1]`` entropy of the distribution (nats).
    """

    log_prob: torch.Tensor
    rank: torch.Tensor
    top_ids: torch.Tensor
    top_log_prob: torch.Tensor
    entropy: torch.Tensor


@torch.no_grad()
def readout_stats(logits: torch.Tensor, token_ids: Sequence[int], top_k: int) -> ReadoutStats:
    """Probabilities, ranks, top-k and entropy of float32 ``logits`` ``[..., vocab]``.

    >>> stats = readout_stats(torch.tensor([[[0.0, 2.0, 1.0]]]), [2], top_k=2)
    >>> stats.rank.tolist(), stats.top_ids.tolist()
    ([[[2]]], [[[1, 2]]])
    """
    logp = torch.log_softmax(logits, dim=-1)
    ids = torch.as_tensor(list(token_ids), dtype=torch.long, device=logits.device)
    tracked = logits[..., ids]  # [..., T]
    # rank = 1 + tokens with a strictly larger logit; one [..., vocab] comparison per tracked token.
    rank = torch.zeros(tracked.shape, dtype=torch.long, device=logits.device)
    for t in range(len(ids)):
        rank[..., t] = (logits > tracked[..., t : t + 1]).sum(-1) + 1
    top_log_prob, top_ids = logp.topk(min(top_k, logits.shape[-1]), dim=-1)
    return ReadoutStats(
        log_prob=logp[..., ids].cpu(),
        rank=rank.cpu(),
        top_ids=top_ids.cpu(),
        top_log_prob=top_log_prob.cpu(),
        entropy=torch.special.entr(logp.exp()).sum(-1).cpu(),
    )


@torch.no_grad()
def lens_tables(
    loaded: LoadedModel,
    prepared: PreparedSample,
    clean: CleanRun,
    sample_row: SampleRow,
    settings: LensSettings,
) -> dict[str, list[Row]]:
    """The ``lens`` and ``lens_top`` rows of one sample, from its clean run.

    ``sample_row`` is the sample's ``samples`` row (its ``answer_token_id`` is the generated token).
    The clean run must have kept the hidden states of every position read
    (``clean.start <= settings.capture_from(prepared)``), e.g. the flow experiment's clean run.

    >>> clean, row = baseline(loaded, prepared, FlowSettings(), settings.capture_from(prepared))  # doctest: +SKIP
    >>> tables = lens_tables(loaded, prepared, clean, row, settings)                               # doctest: +SKIP
    >>> sorted(tables)                                                                             # doctest: +SKIP
    ['lens', 'lens_top']
    """
    decoder, tokenizer = loaded.decoder, loaded.tokenizer
    tracked = tracked_tokens(tokenizer, prepared.sample, sample_row.answer_token_id, skip_blank=settings.skip_blank)
    token_ids = [t.token_id for t in tracked]
    where = settings.positions(prepared)
    # A position in several requested groups is read once and reported under each of them.
    groups_of: dict[int, list[str]] = {}
    for label, positions in where.items():
        for p in positions:
            groups_of.setdefault(p, []).append(label)
    unique = sorted(groups_of)
    input_of = dict(zip(unique, tokenizer.convert_ids_to_tokens(prepared.encoded.input_ids[unique].tolist()), strict=True))
    n_layers = len(clean.hidden) - 1
    chunk = max(1, MAX_LOGIT_ELEMENTS // ((n_layers + 1) * int(clean.logits.shape[-1])))
    base = {"sample_id": prepared.sample.sample_id, "task": sample_row.task}
    lens: list[Row] = []
    top: list[Row] = []
    for lo in range(0, len(unique), chunk):
        positions = unique[lo : lo + chunk]
        states = lens_states(clean, positions)  # [P, L+1, d_model]
        for readout in settings.readouts:
            stats = readout_stats(readout_logits(decoder, states, readout), token_ids, settings.top_k)
            for i, p in enumerate(positions):
                for j in range(n_layers + 1):
                    normed = readout is Readout.NORMED or j == n_layers
                    top_ids = stats.top_ids[i, j].tolist()
                    top_values = {
                        "final_norm": normed,
                        "input_token": str(input_of[p]),
                        "top_token_ids": top_ids,
                        "top_tokens": [str(t) for t in tokenizer.convert_ids_to_tokens(top_ids)],
                        "top_probs": stats.top_log_prob[i, j].exp().tolist(),
                        "entropy": float(stats.entropy[i, j]),
                    }
                    form_values = [
                        {
                            "form": tok.form.value,
                            "final_norm": normed,
                            "word": tok.word,
                            "token_id": tok.token_id,
                            "token": tok.token,
                            "prob": math.exp(float(stats.log_prob[i, j, t])),
                            "log_prob": float(stats.log_prob[i, j, t]),
                            "rank": int(stats.rank[i, j, t]),
                        }
                        for t, tok in enumerate(tracked)
                    ]
                    for label in groups_of[p]:
                        place = {**base, "readout": readout.value, "group": label, "position": p, "layer": j}
                        top.append(LensTopRow(**place, **top_values))
                        lens.extend(LensRow(**place, **values) for values in form_values)
    return {"lens": lens, "lens_top": top}


def lens_sample_tables(loaded: LoadedModel, prepared: PreparedSample, settings: LensSettings) -> dict[str, list[Row]]:
    """Tables for one sample (:meth:`LensSettings.analyse`): ``samples``, and for kept samples
    ``lens``, ``lens_top`` (and ``attention``)."""
    flow_like = FlowSettings(keep_all=settings.keep_all, max_new_tokens=settings.max_new_tokens)
    clean, row = baseline(loaded, prepared, flow_like, settings.capture_from(prepared))
    tables: dict[str, list[Row]] = {"samples": [row]}
    if not row.kept:
        return tables
    tables.update(lens_tables(loaded, prepared, clean, row, settings))
    if settings.attention is not None:
        tables["attention"] = attention_rows(loaded.decoder, prepared, clean, settings.attention, task=row.task)
    return tables


# --- reading results ---------------------------------------------------------------------------------


def first_top1_layers(lens: pd.DataFrame, group: str = Group.LAST.value) -> pd.DataFrame:
    """Per sample, readout and form: the first layer where the tracked token is top-1 (-1: never).

    Also adds form ``answer_any``: the first layer where the answer, in either form, is top-1.

    >>> first_top1_layers(store.read("lens")).head()   # doctest: +SKIP
    """
    import pandas as pd

    frame = lens[lens["group"] == group]
    keys = ["sample_id", "readout", "form"]

    def first(frame_: pd.DataFrame) -> pd.DataFrame:
        hit = frame_[frame_["rank"] == 1].groupby(keys)["layer"].min()
        every = frame_.groupby(keys)["layer"].size().rename("n")
        out = pd.concat([every, hit.rename("first_top1")], axis=1).reset_index()
        out["first_top1"] = out["first_top1"].fillna(-1).astype(int)
        return out.drop(columns="n")

    per_form = first(frame)
    answer = frame[frame["form"].isin([Form.ANSWER.value, Form.ANSWER_CAPITALIZED.value])].copy()
    if len(answer):
        # The answer is top-1 at a layer when either of its forms is (rank 1 in the same readout).
        best = answer.groupby(["sample_id", "readout", "layer"])["rank"].min().reset_index()
        best["form"] = "answer_any"
        per_form = pd.concat([per_form, first(best)], ignore_index=True)
    return per_form.sort_values(keys).reset_index(drop=True)


def summarise_lens(lens: pd.DataFrame) -> dict[str, Any]:
    """Per readout and form, over samples: median first top-1 layer, how many samples reach top-1,
    and the mean probability at the last layer. The layer count ``L`` is included for scale.

    >>> summarise_lens(store.read("lens"))["raw"]["answer_any"]["median_first_top1"]   # doctest: +SKIP
    """
    if lens.empty:
        return {}
    last = lens[lens["group"] == Group.LAST.value]
    n_layers = int(last["layer"].max())
    firsts = first_top1_layers(lens)
    final = last[last["layer"] == n_layers].groupby(["readout", "form"])["prob"].mean()
    out: dict[str, Any] = {"n_layers": n_layers}
    for (readout, form), frame in firsts.groupby(["readout", "form"]):
        reached = frame[frame["first_top1"] >= 0]["first_top1"]
        out.setdefault(str(readout), {})[str(form)] = {
            "samples": len(frame),
            "reach_top1": len(reached),
            "median_first_top1": float(reached.median()) if len(reached) else None,
            "min_first_top1": int(reached.min()) if len(reached) else None,
            "mean_final_prob": float(final[(readout, form)]) if (readout, form) in final.index else None,
        }
    return out

