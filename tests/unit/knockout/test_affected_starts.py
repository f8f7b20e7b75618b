"""The fast engine's first affected position, derived from the clean attention pattern alone."""

from __future__ import annotations

import torch

from vlmflow.adapters.pattern import AttentionPattern, BlockPattern, CausalPattern, PrefixLMPattern
from vlmflow.knockout.ablation import Ablation, Site
from vlmflow.knockout.fast import affected_starts
from vlmflow.knockout.spec import Knockout

N = 12


class _Pattern(AttentionPattern):
    """A stand-in pattern whose clean attention is ``matrix(layer) [n, n]``."""

    is_causal = False  # derive the start from the pattern, even when it is causal

    def __init__(self, matrix):
        self.matrix = matrix

    def allowed(self, layer, rows, n_keys):
        return self.matrix(layer)[rows][:, :n_keys]


def _causal(n: int = N) -> torch.Tensor:
    return torch.ones(n, n, dtype=torch.bool).tril()


def _with_block(lo: int, hi: int, n: int = N) -> torch.Tensor:
    """Causal plus a bidirectional block over positions ``lo..hi-1`` (Gemma-3's image tokens)."""
    allowed = _causal(n)
    allowed[lo:hi, lo:hi] = True
    return allowed


def _knockout(targets, sources, layers) -> Knockout:
    return Knockout(edges=((tuple(targets), tuple(sources)),), layers=tuple(layers))


def test_causal_attention_starts_at_the_first_target():
    pattern = _Pattern(lambda layer: _causal())
    ks = [_knockout([9], [2, 3], [0]), _knockout([5, 11], [1], [2, 3]), Knockout(edges=(((4,), ()),), layers=(0,))]
    assert affected_starts(pattern, 4, N, ks) == [9, 5, -1]


def test_a_causal_pattern_takes_the_first_target_without_reading_the_pattern():
    from vlmflow.adapters.decoder import DecoderMap
    from vlmflow.adapters.registry import family_named

    class _Causal(_Pattern):
        is_causal = True

        def allowed(self, layer, rows, n_keys):
            raise AssertionError("a causal pattern's start needs no attention matrix")

    ks = [_knockout([9], [2, 3], [0]), _knockout([5, 11], [1], [2, 3]), Knockout(edges=(((4,), ()),), layers=(0,))]
    assert affected_starts(_Causal(None), 4, N, ks) == affected_starts(_Pattern(lambda layer: _causal()), 4, N, ks)
    # Only the causal pattern says so; the families that keep the default decoder pattern are causal.
    assert CausalPattern().is_causal
    assert not BlockPattern(torch.full((N,), -1), (None,)).is_causal
    assert not PrefixLMPattern(torch.zeros(N, dtype=torch.bool), (None,)).is_causal
    for name, causal in (("llava", True), ("qwen2_vl", True), ("gemma3", False), ("paligemma", False)):
        default = family_named(name).decoder_class.attention_pattern is DecoderMap.attention_pattern
        assert default is causal, name


def test_a_bidirectional_block_moves_the_start_to_the_block_when_a_target_is_inside_it():
    pattern = _Pattern(lambda layer: _with_block(3, 8))
    # Target inside the block: earlier block positions read it in the next layer.
    assert affected_starts(pattern, 2, N, [_knockout([6], [1], [0])]) == [3]
    # Targets after the block: nothing earlier reads them.
    assert affected_starts(pattern, 2, N, [_knockout([9, 10], [4], [0])]) == [9]
    # A change in the last layer reaches no later layer, so nothing before the target changes.
    assert affected_starts(pattern, 2, N, [_knockout([6], [1], [1])]) == [6]


def test_a_prefix_lm_recomputes_everything_and_a_chain_of_blocks_is_followed():
    prefix = _causal()
    prefix[:10, :10] = True  # positions 0..9 see each other (PaliGemma's prefix)
    assert affected_starts(_Pattern(lambda layer: prefix), 3, N, [_knockout([11], [2], [0])]) == [11]
    assert affected_starts(_Pattern(lambda layer: prefix), 3, N, [_knockout([9], [2], [0])]) == [0]
    # Two overlapping blocks: 6 is read by 4 (block 4..7), which is read by 2 (block 2..5).
    chain = _with_block(4, 8)
    chain[2:6, 2:6] = True
    assert affected_starts(_Pattern(lambda layer: chain), 2, N, [_knockout([6], [0], [0])]) == [2]


def test_only_layers_from_the_first_blocked_one_matter():
    # Layers 0-1 have a block over 3..7, layers 2-3 are causal: a knockout starting in layer 2 cannot
    # spread backwards through the block any more.
    pattern = _Pattern(lambda layer: _with_block(3, 8) if layer < 2 else _causal())
    ks = [_knockout([6], [1], [0]), _knockout([6], [1], [2, 3]), _knockout([6], [1], [1])]
    assert affected_starts(pattern, 4, N, ks) == [3, 6, 6]


def test_ablations_follow_the_same_rule():
    pattern = _Pattern(lambda layer: _with_block(3, 8))
    ablation = Ablation(site=Site.ATTENTION, layers=(1,), positions=(5, 10))
    assert affected_starts(pattern, 3, N, [ablation]) == [3]
