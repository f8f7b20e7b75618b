"""Planted routes (the ground-truth file) and the benchmark's scores, on hand-made curves."""

from __future__ import annotations

import json

import pytest

from vlmflow.errors import ConfigError
from vlmflow.organism.planted import PlantedRecipe, planted_routes
from vlmflow.positions.groups import PAPER_FLOWS, Flow, Group
from vlmflow.validation.routes import (
    ROUTES_FILE,
    PlantedRoutes,
    Route,
    band_names,
    read_planted_routes,
    touches,
)
from vlmflow.validation.scores import auroc, flow_score, lens_score, score_curves


def test_bands_follow_from_the_routes():
    routes = planted_routes(PlantedRecipe())
    bands = {str(f): band for f, band in routes.flows.items()}
    # the related patches are part of the whole image, so their flow is planted in both image bands
    assert bands == {
        "question->last": (6,),
        "image->last": (),
        "image->question": (2, 4),
        "related->question": (2, 4),
        "other->question": (2,),
    }
    assert [str(f) for f in routes.unscored] == ["last->last"]
    assert {str(f) for f in routes.flows} | {"last->last"} == {str(f) for f in PAPER_FLOWS}
    assert band_names(routes, bands["image->question"]) == "lower (2) + middle (4)"
    assert band_names(routes, ()) == "none"


def test_other_bands_give_other_ground_truth():
    routes = planted_routes(PlantedRecipe(layers=10, lower=(1, 2), middle=(4, 5), upper=(7, 8)))
    assert routes.band(Flow.parse("related->question")) == (1, 2, 4, 5)
    assert routes.band("other->question") == (1, 2)
    assert routes.band("question->last") == (7, 8)


def test_the_file_round_trips_and_is_separate_from_the_sidecar(tmp_path):
    routes = planted_routes(PlantedRecipe())
    path = routes.write(tmp_path)
    assert path.name == ROUTES_FILE and path.name != "vlmflow.json"
    assert read_planted_routes(tmp_path) == routes
    assert read_planted_routes(tmp_path / "nothing-here") is None


def test_a_hand_written_file_needs_only_flows_and_depth(tmp_path):
    (tmp_path / ROUTES_FILE).write_text(json.dumps({"n_layers": 4, "flows": {"image->last": [], "question->last": [3]}}))
    routes = read_planted_routes(tmp_path)
    assert routes is not None and [str(f) for f in routes.planted_flows] == ["question->last"]


@pytest.mark.parametrize(
    "data, match",
    [
        ({"n_layers": 4, "flows": {"question->last": [4]}}, "layers in 0..3"),
        ({"n_layers": 4, "flows": {"question->last": [2, 1]}}, "sorted"),
        ({"n_layers": 4, "flows": {}}, "names no flow"),
        ({"n_layers": 4}, "malformed"),
        ({"n_layers": 4, "flows": {"nowhere->last": [1]}}, "unknown position group"),
        ({"format": 9, "n_layers": 4, "flows": {"question->last": [1]}}, "format 9"),
    ],
)
def test_malformed_files_are_refused_with_the_reason(tmp_path, data, match):
    (tmp_path / ROUTES_FILE).write_text(json.dumps(data))
    with pytest.raises(ConfigError, match=match):
        read_planted_routes(tmp_path)


def test_routes_into_the_question_do_not_plant_flows_into_the_last_position():
    routes = PlantedRoutes.from_routes([Route(Group.IMAGE, Group.QUESTION, (1,))], 3, [Flow.parse("image->last")])
    assert routes.band("image->last") == ()


def test_a_window_is_planted_when_it_blocks_a_band_layer():
    assert [c for c in range(8) if touches(c, (2, 4), 1, 8)] == [2, 4]
    assert [c for c in range(8) if touches(c, (2, 4), 3, 8)] == [1, 2, 3, 4, 5]
    assert [c for c in range(8) if touches(c, (6,), 5, 8)] == [4, 5, 6, 7]


def test_auroc_counts_ties_as_half_and_needs_both_sides():
    assert auroc([1.0], [0.0, 0.5]) == 1.0
    assert auroc([0.0], [0.0]) == 0.5
    assert auroc([0.0], [1.0, 2.0]) == 0.0
    assert auroc([], [1.0]) is None


def test_a_curve_inside_its_band_scores_high_and_one_beside_it_low():
    inside = flow_score([0.0, -1.0, -50.0, 0.5, -30.0, 0.0, 0.0, 0.0], band=(2, 4), window=1)
    assert inside.peak_layer == 2 and inside.peak_in_band and inside.peak_error == 0
    assert inside.precision == pytest.approx(80 / 81.5)
    assert inside.auroc == 1.0
    beside = flow_score([0.0, 0.0, -2.0, -50.0, 0.0, 0.0, 0.0, 0.0], band=(2, 4), window=1)
    assert beside.precision == pytest.approx(2 / 52) and not beside.peak_in_band and beside.peak_error == 1
    # a wider window counts layer 3 as planted (it blocks layers 2-4): the smear is forgiven
    assert flow_score([0.0, 0.0, -2.0, -50.0, 0.0, 0.0, 0.0, 0.0], band=(2, 4), window=3).precision == 1.0


def test_an_empty_band_reports_its_largest_effect_and_no_precision():
    score = flow_score([0.1, -3.0, 0.2], band=(), window=1)
    assert score.precision is None and score.peak_in_band is None and score.auroc is None
    assert score.max_abs == 3.0


def test_overall_means_over_planted_flows_and_pools_every_cell():
    table = score_curves(
        {"question->last": [0.0, -10.0], "image->last": [0.0, -20.0], "last->last": [5.0, 5.0]},
        {"question->last": (1,), "image->last": ()},
        window=1,
    )
    overall = table.overall()
    assert set(table.flows) == {"question->last", "image->last"}  # last->last is not scored
    assert overall["precision"] == 1.0 and overall["auroc"] == 1.0
    assert overall["pooled_auroc"] == pytest.approx(2 / 3)  # the planted -10 beats two zeros, not image->last's -20
    assert overall["peaks_in_band"] == 1 and overall["planted_flows"] == 1


def test_lens_score_counts_samples_by_where_the_answer_first_appears():
    score = lens_score([7, 8, 2, -1], after=7)
    assert (score["after_band"], score["before_band"], score["never"]) == (0.5, 0.25, 0.25)
    assert score["median_first_top1"] == 7.0


def test_expectations_come_from_the_routes_file_or_the_plain_organisms_text(tmp_path):
    from vlmflow.organism import organism_path
    from vlmflow.organism.expectations import PLAIN_ORGANISM, expectation_for

    planted_routes(PlantedRecipe()).write(tmp_path)
    known = expectation_for(tmp_path)
    assert known is not None and known.what.startswith("planted-route organism") and "upper band" in known.expected
    assert expectation_for(tmp_path / "missing") is None
    assert expectation_for("llava-hf/llava-1.5-7b-hf") is None
    if (organism_path() / "config.json").is_file():
        assert expectation_for("organism") == PLAIN_ORGANISM
