"""What a knockout did to the answer, per metric: from clean and knocked-out logits to row values.

* ``first-token`` (the paper's): ``p`` is the probability of the baseline's first answer token ``a``
  at the last prompt position, softmax over the full vocabulary.
* ``sequence`` (FG-TRACER's, for free-form answers): ``p`` is the length-normalised probability of
  the model's whole greedy answer ``a_0..a_{R-1}``, teacher-forced: ``exp(mean_i log p(a_i | prompt,
  a_<i))``, the geometric mean of its token probabilities (the R-th root of the sequence
  probability). Under the knockout the same answer is teacher-forced with the knockout applied.
* ``kl``: the KL divergence ``KL(clean || knocked out)`` of the next-token distribution at the last
  prompt position (nats); ``p`` is then the first-token probability.

Every metric gives ``rel_change = 100 * (p_blocked - p_base) / p_base`` and ``logprob_diff =
log p_blocked - log p_base``; the KL divergence is recorded for every metric (it comes from the same
logits).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch

from vlmflow.experiments.settings import Metric


@dataclass(frozen=True)
class Effects:
    """Per knockout (``K`` of them), what it did; tensors on CPU.

    Attributes:
        p_base: the metric's probability without knockout (a float).
        log_p_base: its natural log.
        log_p_blocked: ``[K]`` the same under each knockout.
        answer_changed: ``[K]`` bool: a greedy token under the knockout differs from the answer's.
        blocked_token: ``[K]`` the greedy token at the last prompt position under the knockout.
        kl: ``[K]`` KL(clean || knocked out) of the next-token distribution there (nats).
        n_tokens: answer tokens read (``R``; 1 for first-token and kl).
    """

    p_base: float
    log_p_base: float
    log_p_blocked: torch.Tensor
    answer_changed: torch.Tensor
    blocked_token: torch.Tensor
    kl: torch.Tensor
    n_tokens: int

    @property
    def p_blocked(self) -> torch.Tensor:
        return self.log_p_blocked.exp()

    @property
    def rel_change(self) -> torch.Tensor:
        """``[K]`` 100 * (p_blocked - p_base) / p_base."""
        return 100.0 * (self.p_blocked - self.p_base) / self.p_base

    @property
    def logprob_diff(self) -> torch.Tensor:
        return self.log_p_blocked - self.log_p_base


def effects(metric: Metric, clean: torch.Tensor, blocked: torch.Tensor, answer: Sequence[int]) -> Effects:
    """The effects of ``K`` knockouts.

    Args:
        metric: the run's metric.
        clean: clean logits: ``[vocab]`` (first-token, kl) or ``[R, vocab]`` (sequence: the rows
            predicting ``answer``'s tokens).
        blocked: knocked-out logits: ``[K, vocab]``, or ``[K, R, vocab]`` for sequence.
        answer: the token ids read: the first answer token, or the whole greedy answer (``R``).

    >>> clean = torch.tensor([[2.0, 0.0], [0.0, 2.0]]); blocked = torch.tensor([[[0.0, 0.0], [0.0, 2.0]]])
    >>> e = effects(Metric.SEQUENCE, clean, blocked, [0, 1])
    >>> round(e.p_base, 4), [round(v, 4) for v in e.p_blocked.tolist()], e.answer_changed.tolist()
    (0.8808, [0.6636], [False])
    """
    clean = clean.float().cpu()
    blocked = blocked.float().cpu()
    if metric is Metric.SEQUENCE:
        rows, knocked = clean.reshape(-1, clean.shape[-1]), blocked.reshape(blocked.shape[0], -1, blocked.shape[-1])
    else:  # one row: the last prompt position
        rows, knocked = clean.reshape(1, -1), blocked.reshape(blocked.shape[0], 1, -1)
    ids = torch.as_tensor(list(answer), dtype=torch.long)
    if rows.shape[0] != len(ids) or knocked.shape[1] != len(ids):
        raise ValueError(f"{len(ids)} answer tokens for {rows.shape[0]} clean and {knocked.shape[1]} knocked-out rows")
    log_clean = torch.log_softmax(rows, dim=-1)  # [R, vocab]
    log_knocked = torch.log_softmax(knocked, dim=-1)  # [K, R, vocab]
    steps = torch.arange(len(ids))
    log_p_base = float(log_clean[steps, ids].mean())
    log_p_blocked = log_knocked[:, steps, ids].mean(dim=1)  # [K]
    greedy = knocked.argmax(dim=-1)  # [K, R]
    first_clean, first_knocked = log_clean[0], log_knocked[:, 0]  # the last prompt position
    kl = (first_clean.exp() * (first_clean - first_knocked)).sum(dim=-1)  # [K]
    return Effects(
        p_base=float(torch.tensor(log_p_base).exp()),
        log_p_base=log_p_base,
        log_p_blocked=log_p_blocked,
        answer_changed=(greedy != ids).any(dim=1),
        blocked_token=greedy[:, 0],
        kl=kl.clamp_min(0.0),  # rounding can leave -1e-9 for identical distributions
        n_tokens=len(ids),
    )


def answer_tokens(generated: Iterable[int], stop_ids: Iterable[int]) -> list[int]:
    """The greedy answer's tokens the sequence metric reads: up to the first stop (end-of-sequence) token, without it.

    >>> answer_tokens([5, 9, 2, 0, 0], stop_ids=[2, 0])
    [5, 9]
    """
    stops = set(stop_ids)
    out = []
    for token in generated:
        if int(token) in stops:
            break
        out.append(int(token))
    return out
