"""The knockout engines by :class:`~vlmflow.experiments.settings.Engine` value.

Each engine computes the last-position logits of a batch of knockouts of one encoded sample. The
flows and controls rows and the start-up self-test reach an engine only through :data:`ENGINES`,
so an :class:`Engine` maps to its implementation in this one place.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Protocol

import torch

from vlmflow.errors import SampleError
from vlmflow.experiments.settings import Engine
from vlmflow.knockout.clean import CleanRun, clean_run
from vlmflow.knockout.fast import FoldRequest, affected_starts, fast_logits, fast_logits_batch
from vlmflow.knockout.reference import clean_logits, reference_logits
from vlmflow.knockout.spec import Knockout

if TYPE_CHECKING:
    from vlmflow.inputs import Encoded
    from vlmflow.loading import LoadedModel

__all__ = ["ENGINES", "KnockoutEngine"]


class KnockoutEngine(Protocol):
    """What an engine does for the experiments and for the self-test."""

    def knockout_logits(
        self,
        loaded: LoadedModel,
        encoded: Encoded,
        clean: CleanRun,
        knockouts: Sequence[Knockout],
        max_fold_queries: int | None,
        rows: int | None = None,
    ) -> torch.Tensor:
        """Float32 logits ``[len(knockouts), vocab]`` of the last position under each knockout.

        ``clean`` is the sample's clean run (kept from the first position any knockout changes);
        ``max_fold_queries`` bounds the fast engine's folds (``None``: its default). ``rows=R``: the
        logits of the last ``R`` positions, ``[len(knockouts), R, vocab]`` (a teacher-forced answer;
        ``clean`` then kept ``R`` rows).
        """
        ...

    def knockout_logits_batch(
        self, loaded: LoadedModel, requests: Sequence[FoldRequest], max_fold_queries: int | None
    ) -> list[torch.Tensor | SampleError]:
        """:meth:`knockout_logits` for several samples: per request its logits, or the
        :class:`SampleError` its knockouts raise (the others' results are kept)."""
        ...

    def self_test_logits(
        self, loaded: LoadedModel, encoded: Encoded, knockouts: Sequence[Knockout]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(clean [vocab], knocked-out [len(knockouts), vocab])`` float32 CPU logits, each computed the
        way this engine computes it (the self-test checks the engine's own recomputation)."""
        ...


class _Fast:
    """Exact and batched: knockouts folded together, recomputing only the positions they can change."""

    def knockout_logits(
        self,
        loaded: LoadedModel,
        encoded: Encoded,
        clean: CleanRun,
        knockouts: Sequence[Knockout],
        max_fold_queries: int | None,
        rows: int | None = None,
    ) -> torch.Tensor:
        bound = {} if max_fold_queries is None else {"max_fold_queries": max_fold_queries}
        return fast_logits(loaded.decoder, encoded, clean, knockouts, rows=rows, **bound)

    def knockout_logits_batch(
        self, loaded: LoadedModel, requests: Sequence[FoldRequest], max_fold_queries: int | None
    ) -> list[torch.Tensor | SampleError]:
        bound = {} if max_fold_queries is None else {"max_fold_queries": max_fold_queries}
        return fast_logits_batch(loaded.decoder, requests, **bound)

    @torch.no_grad()
    def self_test_logits(
        self, loaded: LoadedModel, encoded: Encoded, knockouts: Sequence[Knockout]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        decoder = loaded.decoder
        starts = affected_starts(decoder.attention_pattern(encoded), decoder.n_layers, encoded.seq_len, list(knockouts))
        start = min((s for s in starts if s >= 0), default=0)
        clean = clean_run(decoder, encoded, capture_from=start)
        return clean.logits.cpu(), fast_logits(decoder, encoded, clean, knockouts).cpu()


class _Reference:
    """One full hooked forward per knockout (the path the fast engine is tested against)."""

    def knockout_logits(
        self,
        loaded: LoadedModel,
        encoded: Encoded,
        clean: CleanRun,
        knockouts: Sequence[Knockout],
        max_fold_queries: int | None,
        rows: int | None = None,
    ) -> torch.Tensor:
        return reference_logits(loaded.decoder, encoded, knockouts, rows=rows)

    def knockout_logits_batch(
        self, loaded: LoadedModel, requests: Sequence[FoldRequest], max_fold_queries: int | None
    ) -> list[torch.Tensor | SampleError]:
        out: list[torch.Tensor | SampleError] = []
        for r in requests:  # one full forward per knockout: nothing to share between samples
            try:
                out.append(reference_logits(loaded.decoder, r.encoded, r.knockouts))
            except SampleError as exc:
                out.append(exc)
        return out

    @torch.no_grad()
    def self_test_logits(
        self, loaded: LoadedModel, encoded: Encoded, knockouts: Sequence[Knockout]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        decoder = loaded.decoder
        return clean_logits(decoder, encoded).cpu(), reference_logits(decoder, encoded, knockouts).cpu()


#: The implementation of each engine.
ENGINES: Mapping[Engine, KnockoutEngine] = {Engine.FAST: _Fast(), Engine.REFERENCE: _Reference()}
