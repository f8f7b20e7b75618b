from __future__ import annotations

import pytest

from vlmflow.data.csvio import write_task_csv
from vlmflow.data.datasets import load_samples, released_specs
from vlmflow.data.sample import Box, Sample, SceneObject, TaskType
from vlmflow.errors import ConfigError


@pytest.mark.parametrize("spec", ["gqa:ChooseRel", "GQA:chooserel", "gqa: ChooseRel "])
def test_gqa_specs_load_the_packaged_file(spec):
    result, task = load_samples(spec)
    assert task == "ChooseRel"
    assert len(result.samples) == 964 and result.errors == []


def test_released_specs_name_all_six():
    assert released_specs() == tuple(f"gqa:{t.value}" for t in TaskType)


def test_unknown_gqa_task_lists_the_valid_ones():
    with pytest.raises(ConfigError, match="'ChooseColour'.*gqa:ChooseAttr, gqa:ChooseCat, .*gqa:QueryAttr"):
        load_samples("gqa:ChooseColour")


def test_csv_path_and_missing_path(tmp_path):
    sample = Sample(
        "q1", "img", "On which side is the cup?", "left", task=TaskType.QUERY_ATTR,
        objects=(SceneObject("cup", "1", Box(0, 0, 4, 4)),), image_size=(10, 10),
    )
    path = tmp_path / "mine_QueryAttr.csv"
    write_task_csv([sample], path)
    result, task = load_samples(path)
    assert task == "QueryAttr" and result.samples == [sample]
    result, task = load_samples(str(path))
    assert task == "QueryAttr"
    with pytest.raises(ConfigError, match="neither an existing data file.*gqa:QueryAttr"):
        load_samples(tmp_path / "nope.csv")
