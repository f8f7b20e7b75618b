"""The fast engine next to the reference path for one prepared sample: what the equivalence tests compare."""

from __future__ import annotations

from typing import Any

import torch

from vlmflow.knockout.fast import affected_starts, clean_run, fast_logits
from vlmflow.knockout.reference import reference_logits
from vlmflow.knockout.spec import Knockout


def fast_and_reference(loaded: Any, prepared: Any, knockouts: list[Knockout]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Log-probabilities ``(fast, reference, clean)``: ``[len(knockouts), vocab]`` twice, then ``[vocab]``."""
    decoder, encoded = loaded.decoder, prepared.encoded
    start = min(affected_starts(decoder.attention_pattern(encoded), loaded.n_layers, encoded.seq_len, knockouts))
    clean = clean_run(decoder, encoded, capture_from=start)
    fast = torch.log_softmax(fast_logits(decoder, encoded, clean, knockouts), dim=-1)
    ref = torch.log_softmax(reference_logits(decoder, encoded, knockouts), dim=-1)
    return fast, ref, torch.log_softmax(clean.logits, dim=-1)


def route(targets: Any, sources: Any, layers: Any) -> Knockout:
    """The knockout "``targets`` may not attend to ``sources``" in ``layers`` (positions, not groups)."""
    return Knockout(edges=((tuple(targets), tuple(sources)),), layers=tuple(layers))
