"""The shipped planted-route organism and the benchmark on it: it loads like any checkpoint, answers at
its recorded accuracy, ``vlmflow validate`` recovers its planted bands, and planted bugs in vlmflow's
position groups make the benchmark fail.

Skipped (with the reason) only when the package holds no planted organism.
"""

from __future__ import annotations

import json

import pytest

from vlmflow.data.sample import TaskType
from vlmflow.errors import ConfigError
from vlmflow.organism import PLANTED_ALIAS, organism_path
from vlmflow.positions.groups import Group, PositionGroups
from vlmflow.validation.routes import read_planted_routes

PLANTED = organism_path(PLANTED_ALIAS)
pytestmark = pytest.mark.skipif(
    not (PLANTED / "config.json").is_file(),
    reason="the planted organism is not in the package (vlmflow/resources/organism-planted has no config.json)",
)


@pytest.fixture(scope="module")
def loaded():
    from vlmflow.loading import load_model

    return load_model(PLANTED_ALIAS, device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def routes():
    return read_planted_routes(PLANTED)


@pytest.fixture(scope="module")
def validated(loaded, tmp_path_factory):
    """``vlmflow validate`` on the shipped planted organism (windows 1 and 3, the default scenes)."""
    from vlmflow.cli.main import main

    out = tmp_path_factory.mktemp("validate")
    assert main(["validate", "--window", "1", "--window", "3", "--out", str(out)]) == 0
    return out, json.loads((out / "validation.json").read_text())


def test_it_is_a_standard_llava_checkpoint_with_its_ground_truth(loaded, routes):
    from transformers import LlavaForConditionalGeneration

    assert isinstance(loaded.model, LlavaForConditionalGeneration)
    assert loaded.info["model"] == str(PLANTED) and loaded.info["attn_implementation"] == "sdpa"
    assert 8 <= loaded.n_layers <= 12 and routes.n_layers == loaded.n_layers
    assert sum(p.stat().st_size for p in PLANTED.glob("*.safetensors")) < 8 * 2**20
    assert set(json.loads((PLANTED / "vlmflow.json").read_text())) == {"prompt_template"}
    bands = {str(f): b for f, b in routes.flows.items()}
    lower, middle, upper = routes.bands["lower"], routes.bands["middle"], routes.bands["upper"]
    assert bands["image->question"] == bands["related->question"] == tuple(sorted({*lower, *middle}))
    assert bands["other->question"] == lower and bands["question->last"] == upper and bands["image->last"] == ()


def test_held_out_accuracy_is_the_recorded_one_and_meets_the_bar(loaded):
    from vlmflow.organism.encode import BatchEncoder
    from vlmflow.organism.evaluate import evaluate, held_out_questions

    held_out = json.loads((PLANTED / "organism.json").read_text())["held_out"]
    table = evaluate(loaded.model, BatchEncoder(loaded.processor, loaded.template), held_out_questions(held_out["per_task"], held_out["seed"]))
    for task in [t.value for t in TaskType] + ["all"]:
        assert table[task]["n"] == held_out["accuracy"][task]["n"]
        assert abs(table[task]["accuracy"] - held_out["accuracy"][task]["accuracy"]) <= 2.0, task
        if task != "all":
            assert table[task]["accuracy"] >= 90.0, task


@pytest.mark.slow
def test_validate_recovers_every_planted_band(validated):
    out, report = validated
    window1 = report["windows"]["1"]
    assert window1["overall"]["precision"] >= 0.9, window1["overall"]
    for flow, score in window1["flows"].items():
        if score["band"]:
            assert score["peak_in_band"], (flow, score)
            assert score["peak_error"] == 0
    assert max(abs(v) for v in window1["flows"]["image->last"]["curve"]) < 5.0
    assert "last->last" not in window1["flows"]  # not planted either way, so not scored
    # a wider window smears each route over its neighbours, but the peaks stay on planted windows
    assert report["windows"]["3"]["overall"]["peaks_in_band"] == report["windows"]["3"]["overall"]["planted_flows"]
    assert report["samples"]["n"] == 12 * len(TaskType)
    assert (out / "validation.png").is_file() and report["figure"] == "validation.png"
    assert report["lens"]["normed"]["after_band"] >= 0.5
    assert report["attention"]["flows"]["question->last"]["peak_in_band"]


def _bugged(build, bug: str):
    def build_groups(*args, **kwargs) -> PositionGroups:
        groups = build(*args, **kwargs)
        positions = dict(groups.positions)
        if bug == "related and other swapped":
            if Group.RELATED in positions and Group.OTHER in positions:  # the self-test's sample has no boxes
                positions[Group.RELATED], positions[Group.OTHER] = positions[Group.OTHER], positions[Group.RELATED]
        else:  # the question group one token early: the "?" out, the image's last token in
            positions[Group.QUESTION] = tuple(p - 1 for p in positions[Group.QUESTION])
        return PositionGroups(groups.seq_len, positions, groups.missing)

    return build_groups


def _validate_with_bug(loaded, out, monkeypatch, bug: str) -> dict:
    import vlmflow.experiments.prepare as prepare
    from vlmflow.validation.benchmark import ValidationSettings, run_validation

    monkeypatch.setattr(prepare, "build_position_groups", _bugged(prepare.build_position_groups, bug))
    result = run_validation(PLANTED_ALIAS, out, ValidationSettings(windows=(1,), readouts=False), loaded=loaded, plot=False)
    return result.report["windows"]["1"]


@pytest.mark.slow
def test_swapped_related_and_other_patches_fail_the_benchmark(loaded, validated, tmp_path, monkeypatch):
    bugged = _validate_with_bug(loaded, tmp_path, monkeypatch, "related and other swapped")
    good = validated[1]["windows"]["1"]
    assert bugged["overall"]["precision"] < 0.9 <= good["overall"]["precision"], bugged["overall"]
    assert bugged["overall"]["peaks_in_band"] < bugged["overall"]["planted_flows"]
    assert not bugged["flows"]["other->question"]["peak_in_band"]  # it now carries the middle band's dip


@pytest.mark.slow
def test_a_question_group_one_token_off_weakens_question_to_last(loaded, validated, tmp_path, monkeypatch):
    """A one-token shift keeps the question's content words in the group, so the routes are still found
    where they are (localisation is not fooled), but the knockout of question->last misses the "?", where
    the answer is read from, and its effect shrinks."""
    bugged = _validate_with_bug(loaded, tmp_path, monkeypatch, "question one token early")
    good = validated[1]["windows"]["1"]
    assert bugged["flows"]["question->last"]["max_abs"] < 0.9 * good["flows"]["question->last"]["max_abs"]
    assert bugged["flows"]["question->last"]["peak_layer"] == good["flows"]["question->last"]["peak_layer"]


def test_validate_refuses_a_model_without_planted_routes(tmp_path):
    from vlmflow.validation.benchmark import routes_of

    with pytest.raises(ConfigError, match="declares no planted routes"):
        routes_of("organism")
    with pytest.raises(ConfigError, match="declares no planted routes"):
        routes_of(tmp_path)
