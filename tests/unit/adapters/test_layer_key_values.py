"""DecoderMap.layer_key_values refuses a layer that never hands its keys/values to the cache
(the per-family equality with the model's own cache is in tests/integration/test_families_more.py)."""

from __future__ import annotations

import pytest
import torch

from vlmflow.adapters.decoder import DecoderMap


def test_layer_key_values_refuses_a_layer_that_never_hands_over_its_keys(monkeypatch):
    decoder = DecoderMap(torch.nn.Linear(1, 1))
    # A layer that returns its input without calling its attention's cache update.
    monkeypatch.setattr(DecoderMap, "run_layer", lambda self, layer, hidden, *rest, **kw: hidden)
    with pytest.raises(RuntimeError, match="did not hand its keys/values"):
        decoder.layer_key_values(3, torch.zeros(1, 2, 4), torch.arange(2)[None], None)
