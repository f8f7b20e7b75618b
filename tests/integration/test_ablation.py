"""Module-level ablations: the fast folded engine equals the reference hooks, and the ablation does
exactly what it says (replaces the site's output at the positions, leaves everything before alone)."""

from __future__ import annotations

import pytest
import torch

from vlmflow.errors import ConfigError
from vlmflow.knockout.ablation import (
    Ablation,
    AblationHookError,
    AblationMode,
    Site,
    module_ablation,
    reference_ablation_logits,
    replacement_values,
    site_module,
)
from vlmflow.knockout.fast import clean_run, fast_logits
from vlmflow.knockout.reference import clean_logits, reference_logits
from vlmflow.knockout.spec import Knockout
from vlmflow.positions.groups import Flow, Group

SHAPES = ["sp-gqa", "bpe-mha", "word-mqa"]
IMPLS = ["sdpa", "eager"]


def _ablations(loaded, groups):
    n_layers = loaded.n_layers
    windows = [(0,), (1, 2), (n_layers - 1,)]
    out = [
        Ablation.for_group(groups, group, site, layers, mode)
        for group in (Group.IMAGE, Group.RELATED, Group.QUESTION, Group.LAST)
        for site in Site
        for mode in AblationMode
        for layers in windows
    ]
    # Mean over another group: image patches replaced by the average of the whole image.
    out.append(Ablation.for_group(groups, Group.RELATED, Site.MLP, [1], AblationMode.MEAN, mean_over=Group.IMAGE))
    return out


def _logp(x):
    return torch.log_softmax(x, -1)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("shape", SHAPES)
def test_fast_equals_reference(tiny_prepared, shape, impl):
    loaded, prepared = tiny_prepared(shape, impl)
    ablations = _ablations(loaded, prepared.groups)
    clean = clean_run(loaded.decoder, prepared.encoded, capture_from=0)
    fast = fast_logits(loaded.decoder, prepared.encoded, clean, ablations)
    ref = reference_ablation_logits(loaded.decoder, prepared.encoded, ablations)
    torch.testing.assert_close(_logp(fast), _logp(ref), atol=1e-5, rtol=0)
    # Zero ablations that can reach the output must move it (a hook that did nothing would pass the
    # comparison); one confined to the last layer at earlier positions cannot, and changes nothing.
    base = _logp(clean.logits)
    last, top = prepared.encoded.seq_len - 1, loaded.n_layers - 1
    zero = [i for i, a in enumerate(ablations) if a.mode is AblationMode.ZERO]
    reach = [i for i in zero if last in ablations[i].positions or ablations[i].first_layer < top]
    dead = [i for i in zero if i not in reach]
    assert reach and dead
    assert (_logp(ref[reach]) - base).abs().amax(-1).min() > 1e-4
    torch.testing.assert_close(_logp(ref[dead]), base.expand(len(dead), -1), atol=1e-6, rtol=0)


@pytest.mark.parametrize("impl", IMPLS)
def test_ablations_and_knockouts_fold_together(tiny_prepared, impl):
    loaded, prepared = tiny_prepared("sp-gqa", impl)
    g = prepared.groups
    knockouts = [
        Knockout.for_flows(g, [Flow(Group.IMAGE, Group.LAST)], [1, 2]),
        Knockout.for_flows(g, [Flow(Group.QUESTION, Group.LAST)], [0, 1], heads=[1]),
    ]
    ablations = [
        Ablation.for_group(g, Group.LAST, Site.ATTENTION, [1, 2]),
        Ablation.for_group(g, Group.QUESTION, Site.MLP, [0], AblationMode.MEAN),
    ]
    mixed = [knockouts[0], ablations[0], knockouts[1], ablations[1]]
    clean = clean_run(loaded.decoder, prepared.encoded, capture_from=0)
    fast = fast_logits(loaded.decoder, prepared.encoded, clean, mixed, max_fold_queries=4096)
    ref_k = reference_logits(loaded.decoder, prepared.encoded, knockouts)
    ref_a = reference_ablation_logits(loaded.decoder, prepared.encoded, ablations)
    expected = torch.stack([ref_k[0], ref_a[0], ref_k[1], ref_a[1]])
    torch.testing.assert_close(_logp(fast), _logp(expected), atol=1e-5, rtol=0)


def test_mean_over_the_position_itself_changes_nothing(tiny_prepared):
    loaded, prepared = tiny_prepared("bpe-mha")
    last = prepared.groups[Group.LAST]
    noop = [Ablation(site, tuple(range(loaded.n_layers)), last, AblationMode.MEAN) for site in Site]
    base = clean_logits(loaded.decoder, prepared.encoded)
    ref = reference_ablation_logits(loaded.decoder, prepared.encoded, noop)
    torch.testing.assert_close(ref, torch.stack([base, base]), atol=1e-5, rtol=0)
    clean = clean_run(loaded.decoder, prepared.encoded, capture_from=0)
    fast = fast_logits(loaded.decoder, prepared.encoded, clean, noop)
    torch.testing.assert_close(fast, torch.stack([base, base]), atol=1e-5, rtol=0)


def _site_outputs(loaded, prepared, site, layer, ablation=None):
    """The site's output ``[seq, d_model]`` in ``layer`` of one full forward (optionally ablated)."""
    seen = {}
    module = site_module(loaded.decoder, site, layer)

    def keep(mod, args, out):
        seen["out"] = (out[0] if isinstance(out, tuple) else out)[0].detach().clone()

    # Registered first, so it sees the output after the ablation hook registered below has replaced it.
    handle = None
    try:
        if ablation is None:
            handle = module.register_forward_hook(keep)
            with torch.no_grad():
                loaded.model(**prepared.encoded.inputs)
        else:
            values = replacement_values(loaded.decoder, prepared.encoded, [ablation])[0]
            with module_ablation(loaded.decoder, prepared.encoded, ablation, values):
                handle = module.register_forward_hook(keep)
                with torch.no_grad():
                    loaded.model(**prepared.encoded.inputs)
    finally:
        if handle is not None:
            handle.remove()
    return seen["out"]


@pytest.mark.parametrize("site", list(Site))
@pytest.mark.parametrize("mode", list(AblationMode))
def test_the_site_output_is_replaced_at_the_positions_only(tiny_prepared, site, mode):
    loaded, prepared = tiny_prepared("sp-gqa")
    positions = prepared.groups[Group.QUESTION]
    layer = 1
    ablation = Ablation(site, (layer,), positions, mode)
    clean = _site_outputs(loaded, prepared, site, layer)
    ablated = _site_outputs(loaded, prepared, site, layer, ablation)
    rows = list(positions)
    expected = torch.zeros_like(clean[0]) if mode is AblationMode.ZERO else clean[rows].mean(0)
    torch.testing.assert_close(ablated[rows], expected.expand(len(rows), -1), atol=1e-6, rtol=0)
    others = [p for p in range(prepared.encoded.seq_len) if p not in set(rows)]
    # In the first ablated layer the other positions' outputs are untouched.
    torch.testing.assert_close(ablated[others], clean[others], atol=0, rtol=0)


def test_positions_before_the_ablation_are_untouched_in_every_layer(tiny_prepared):
    loaded, prepared = tiny_prepared("word-mqa")
    first = prepared.groups[Group.QUESTION][0]
    ablation = Ablation.for_group(prepared.groups, Group.QUESTION, Site.MLP, range(loaded.n_layers))
    values = replacement_values(loaded.decoder, prepared.encoded, [ablation])[0]
    with torch.no_grad():
        clean = loaded.model(**prepared.encoded.inputs, output_hidden_states=True).hidden_states
        with module_ablation(loaded.decoder, prepared.encoded, ablation, values):
            ablated = loaded.model(**prepared.encoded.inputs, output_hidden_states=True).hidden_states
    for j, (c, a) in enumerate(zip(clean, ablated, strict=True)):
        torch.testing.assert_close(a[0, :first], c[0, :first], atol=0, rtol=0)
        if j > 1:
            assert (a[0, first:] - c[0, first:]).abs().max() > 1e-4, f"layer boundary {j} unchanged"


def _hook_count(loaded):
    return sum(
        len(site_module(loaded.decoder, site, layer)._forward_hooks)
        for site in Site
        for layer in range(loaded.n_layers)
    )


def test_hooks_are_removed_after_an_exception_and_partial_sequences_are_refused(tiny_prepared):
    loaded, prepared = tiny_prepared("sp-gqa")
    ablation = Ablation.for_group(prepared.groups, Group.IMAGE, Site.ATTENTION, [0, 1])
    values = replacement_values(loaded.decoder, prepared.encoded, [ablation])[0]
    # transformers may keep its own output-recording hooks installed; count ours on top of them.
    before = _hook_count(loaded)
    with pytest.raises(RuntimeError, match="boom"), module_ablation(loaded.decoder, prepared.encoded, ablation, values):
        assert _hook_count(loaded) == before + 2
        raise RuntimeError("boom")
    assert _hook_count(loaded) == before
    with module_ablation(loaded.decoder, prepared.encoded, ablation, values), pytest.raises(
        AblationHookError, match="query positions"
    ):
        loaded.model.generate(**prepared.encoded.inputs, max_new_tokens=2, do_sample=False)
    assert _hook_count(loaded) == before


def test_out_of_range_ablations_are_refused_by_both_paths(tiny_prepared):
    loaded, prepared = tiny_prepared("sp-gqa")
    bad = Ablation(Site.MLP, (loaded.n_layers,), (prepared.encoded.seq_len - 1,))
    with pytest.raises(ConfigError, match="out of range"):
        reference_ablation_logits(loaded.decoder, prepared.encoded, [bad])
    clean = clean_run(loaded.decoder, prepared.encoded, capture_from=0)
    with pytest.raises(ConfigError, match="out of range"):
        fast_logits(loaded.decoder, prepared.encoded, clean, [bad])
