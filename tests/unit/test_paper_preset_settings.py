"""The paper's preset without a model: the patch-rule setting, the stop ids, the bundled paper config,
``vlmflow reproduce paper --dry-run`` and ``vlmflow gqa stats`` under both rules."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest

from vlmflow.data.csvio import ReadResult, write_task_csv
from vlmflow.data.sample import Box, Sample, SceneObject, TaskType
from vlmflow.errors import ConfigError
from vlmflow.load_spec import LoadSpec
from vlmflow.loading import stop_token_ids
from vlmflow.positions.anyres import LLAVA_NEXT_PINPOINTS, anyres_geometry
from vlmflow.positions.task_stats import task_stats
from vlmflow.settings import declared

PAPER_MODELS = ("llava-1.5-7b", "llava-1.5-13b", "llava-v1.6-vicuna-7b", "llama3-llava-next-8b")


def test_patch_rule_is_a_family_option_recorded_only_when_set():
    assert LoadSpec("m").identity() == LoadSpec("m", patch_rule=None).identity()
    assert "patch_rule" not in LoadSpec("m").identity() and LoadSpec("m").identity()["options"] == {}
    paper = LoadSpec("m", patch_rule="paper")
    assert paper.options == (("patch_rule", "paper"),) and paper.identity()["options"] == {"patch_rule": "paper"}
    assert LoadSpec("m", options={"patch_rule": "paper"}).patch_rule == "paper"
    both = LoadSpec("m", image_mode="resize", patch_rule="paper")
    assert dict(both.options) == {"image_mode": "resize", "patch_rule": "paper"}
    with pytest.raises(ConfigError, match="^patch_rule: unknown patch rule 'exact'; valid: overlap, paper$"):
        LoadSpec("m", patch_rule="exact")
    (d,) = [d for d in declared(LoadSpec) if d.attr == "patch_rule"]
    assert d.flags == ("--patch-rule",) and d.config == "patch_rule" and d.keyword


def test_patch_rule_reaches_the_flows_and_lens_commands(capsys):
    from vlmflow.cli.main import main

    for command in ("flows", "lens"):
        assert main([command, "--help"]) == 0
        assert "--patch-rule" in capsys.readouterr().out
    # A bad value is named with the flag before any model is looked for.
    assert main(["flows", "--model", "m", "--data", "gqa:QueryAttr", "--patch-rule", "exact"]) == 2
    assert "--patch-rule: unknown patch rule 'exact'; valid: overlap, paper" in capsys.readouterr().err


@pytest.mark.parametrize(
    "found, eos, expected",
    [([128009, 128001], 128001, (128009, 128001)), (2, 2, (2,)), (None, 2, (2,)), (None, None, ()), ((5, 6), 7, (5, 6, 7))],
)
def test_stop_ids_are_every_generation_config_id_then_the_tokenizers(found, eos, expected):
    model = SimpleNamespace(generation_config=SimpleNamespace(eos_token_id=found))
    assert stop_token_ids(model, SimpleNamespace(eos_token_id=eos)) == expected
    assert stop_token_ids(SimpleNamespace(), SimpleNamespace(eos_token_id=eos)) == ((eos,) if eos is not None else ())


def test_bundled_paper_config_is_the_papers_preset():
    from vlmflow.study.bundled import resolve_config
    from vlmflow.study.config import load_config

    config = load_config_with_images(resolve_config("paper"), load_config)
    assert tuple(m.label for m in config.models) == PAPER_MODELS
    assert all(m.spec.dtype == "float16" and m.spec.patch_rule == "paper" for m in config.models)
    assert config.lens is not None and config.lens.top_k == 50


def load_config_with_images(path: Path, load_config):  # noqa: ANN001, ANN201 - test helper
    import os

    saved = os.environ.get("GQA_IMAGES")
    os.environ["GQA_IMAGES"] = "/nonexistent-gqa-images"
    try:
        return load_config(path)
    finally:
        if saved is None:
            del os.environ["GQA_IMAGES"]
        else:
            os.environ["GQA_IMAGES"] = saved


def test_reproduce_paper_dry_run_prints_dtype_and_rule_per_model(capsys, monkeypatch):
    from vlmflow.cli.main import main

    monkeypatch.setenv("GQA_IMAGES", "/nonexistent-gqa-images")
    assert main(["reproduce", "paper", "--dry-run"]) == 0
    lines = capsys.readouterr().out.splitlines()
    for label in PAPER_MODELS:
        (line,) = [x for x in lines if x.strip().startswith(f"model {label}:")]
        assert "dtype float16" in line and "patch rule paper" in line, line


def test_study_config_reads_patch_rule_per_model():
    from vlmflow.study.config import parse_config

    config = parse_config({"models": [{"model": "m", "patch_rule": "paper"}, "n"], "tasks": ["gqa:QueryAttr"]})
    assert [m.spec.patch_rule for m in config.models] == ["paper", None]
    with pytest.raises(ConfigError, match=r"^models\[0\]\.patch_rule: unknown patch rule 'x'; valid: overlap, paper$"):
        parse_config({"models": [{"model": "m", "patch_rule": "x"}], "tasks": ["gqa:QueryAttr"]})


def _sample(qid: str, size: tuple[int, int], *boxes: Box) -> Sample:
    objects = tuple(SceneObject(f"o{k}", str(k), b) for k, b in enumerate(boxes))
    return Sample(qid, "img", "Q?", "yes", task=TaskType.LOGICAL_OBJ, objects=objects, image_size=size)


def test_task_stats_report_both_rules_and_their_difference():
    # view 42 = image 42: no resize. A box on a patch boundary gains the next patches under the paper's
    # inclusive rectangle (1 -> 4 tokens); a box inside one patch stays one token under both rules.
    result = ReadResult(samples=[_sample("a", (42, 42), Box(0, 0, 14, 14)), _sample("b", (42, 42), Box(2, 2, 5, 5))], errors=[])
    overlap = task_stats(result, "toy", mode="pad", view_size=42, patch_size=14)
    paper = task_stats(result, "toy", mode="pad", view_size=42, patch_size=14, rule="paper")
    assert (overlap.related_median, paper.related_median) == (1.0, 2.5)
    assert (overlap.overlap_median, overlap.paper_median) == (paper.overlap_median, paper.paper_median) == (1.0, 2.5)
    assert (paper.rows_differ, paper.difference_mean, paper.difference_max) == (1, 1.5, 3)
    assert (overlap.related_max, paper.related_max) == (1, 4)
    anyres = task_stats(result, "toy", mode="anyres", rule="paper")
    layout = anyres_geometry((42, 42), view_size=336, patch_size=14, pinpoints=LLAVA_NEXT_PINPOINTS)
    assert anyres.n_tokens == layout.n_tokens and anyres.rule == "paper"
    assert anyres.paper_median >= anyres.overlap_median > 0


def test_gqa_stats_prints_both_rules(tmp_path: Path, capsys):
    from vlmflow.cli.main import main

    csv = tmp_path / "GQA_val_correct_question_with_existThatOr_LogicalObj.csv"
    write_task_csv([_sample("00001", (42, 42), Box(0, 0, 14, 14)), _sample("00002", (42, 42), Box(2, 2, 5, 5))], csv)
    assert main(["gqa", "stats", str(csv), "--view-size", "42", "--patch-rule", "paper"]) == 0
    out = capsys.readouterr().out
    assert "9 image tokens per sample (pad, view 42, patch 14), paper rule" in out
    assert "two patch rules" in out
    row = [line.split() for line in out.splitlines() if line.strip().startswith("LogicalObj")]
    assert row[0][:6] == ["LogicalObj", "2", "0", "2.5", "2.5", "1-4"]  # rows, bad, median, mean, min-max
    assert row[1] == ["LogicalObj", "1", "2.5", "1", "+1.50", "3"]  # medians, rows differ, mean, max
    assert main(["gqa", "stats", str(csv), "--patch-rule", "exact"]) == 2
