"""What a user runs with videos and several images: `vlmflow organism scenes --video`, then `vlmflow flows`
on a tiny random Qwen2-VL-style model (in this process), with the paper's groups and with routes that
name single frames and images (``frame[0]->last``, ``image[1]->question``)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
import torch
from PIL import Image, ImageDraw

from support.compare import fast_and_reference, route
from support.tiny_qwen2_vl import TinyQwen2VLConfig, build_tiny_qwen2_vl
from vlmflow.cli.main import main
from vlmflow.data.csvio import write_task_csv
from vlmflow.data.sample import Box, Sample, SceneObject, TaskType
from vlmflow.experiments.windows import sweep
from vlmflow.positions.groups import Group

RUN = ["--window", "1", "--keep-all", "--device", "cpu", "--dtype", "float32", "--max-new-tokens", "1"]


@pytest.fixture(scope="module")
def tiny_qwen(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Qwen2-VL whose temporal patch is one frame, so a two-frame video has two model frames."""
    path = tmp_path_factory.mktemp("tiny-qwen2-vl-t1")
    build_tiny_qwen2_vl(TinyQwen2VLConfig(temporal_patch_size=1, seed=3), path)
    return path


def _video_set(folder: Path, capsys) -> Path:
    assert main(["organism", "scenes", str(folder), "--video", "-n", "2", "--frames", "2"]) == 0
    assert "video:" in capsys.readouterr().out
    return folder / "scenes_video_ChooseRel.csv"


def _two_image_set(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    first = Image.new("RGB", (40, 30), (30, 120, 30))
    ImageDraw.Draw(first).rectangle((6, 8, 17, 19), fill=(220, 20, 20))
    second = Image.new("RGB", (30, 44), (20, 20, 200))
    first.save(folder / "first.png")
    second.save(folder / "second.png")
    sample = Sample(
        "q1", "first", "Is the square red or blue?", "red", task=TaskType.CHOOSE_ATTR, true_option="red",
        false_option="blue", objects=(SceneObject("square", "1", Box(6, 8, 12, 12)),), image_size=(40, 30),
        images=("first", "second"),
    )
    write_task_csv([sample], folder / "two_ChooseAttr.csv")
    return folder / "two_ChooseAttr.csv"


def _flows(args: list[str], run: Path) -> pd.DataFrame:
    assert main(["flows", *args, *RUN, "--out", str(run.parent), "--name", run.name]) == 0
    return pd.read_parquet(run / "flows.parquet")


def test_video_scenes_then_flows_with_the_paper_groups(tiny_qwen, tmp_path, capsys):
    csv = _video_set(tmp_path / "video", capsys)
    flows = _flows(["--model", str(tiny_qwen), "--data", str(csv), "-f", "image->last", "-f", "related->question"],
                   tmp_path / "runs" / "video")
    assert "2 samples" in " ".join(capsys.readouterr().out.split())
    assert len(flows) == 2 * 2 * 4 and flows["rel_change"].notna().all()
    assert flows.loc[flows["flow"] == "image->last", "rel_change"].abs().max() > 1e-3


def test_two_images_then_flows_with_the_paper_groups(tiny_qwen, tmp_path, capsys):
    csv = _two_image_set(tmp_path / "two")
    flows = _flows(["--model", str(tiny_qwen), "--data", str(csv), "-f", "image->question"], tmp_path / "runs" / "two")
    assert len(flows) == 4 and flows["rel_change"].abs().max() > 1e-3


def _prepared_as_the_runner_reads_them(model: Path, csv: Path, impl: str) -> list:
    """The samples of ``csv`` read, opened and prepared as ``vlmflow flows`` does (runner.load_data,
    open_visuals, prepare_sample), on ``model`` loaded as the command loads it."""
    from vlmflow.experiments.prepare import open_visuals, prepare_sample
    from vlmflow.experiments.runner import DataSpec, load_data
    from vlmflow.loading import load_model

    loaded = load_model(model, device="cpu", dtype="float32", attn_implementation=impl)
    samples, errors, images = load_data(DataSpec(str(csv)))
    assert errors == []
    return [(loaded, prepare_sample(loaded, s, open_visuals(s, images), check_answer=False)) for s in samples]


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_the_commands_data_path_gives_frame_and_image_items_whose_routes_are_exact(tiny_qwen, tmp_path, capsys, impl):
    """What ``frame[0]->last`` and ``image[1]->question`` will select once the grammar lands: the
    items of the groups prepared from the same files, knocked out in every single-layer window;
    fast == reference and each route changes the answer distribution."""
    video, two = _video_set(tmp_path / "video", capsys), _two_image_set(tmp_path / "two")
    cases = [(p, Group.FRAME, 0, Group.LAST) for p in _prepared_as_the_runner_reads_them(tiny_qwen, video, impl)]
    cases += [(p, Group.IMAGE, 1, Group.QUESTION) for p in _prepared_as_the_runner_reads_them(tiny_qwen, two, impl)]
    assert len(cases) == 3
    for (loaded, prepared), group, index, target in cases:
        g = prepared.groups
        items = g.items(group)
        assert len(items) == 2 and items[0][-1] < items[1][0] and set(items[index]) < set(g[Group.IMAGE])
        knockouts = [route(g[target], items[index], layers) for _, layers in sweep(1, loaded.n_layers)]
        fast, ref, clean = fast_and_reference(loaded, prepared, knockouts)
        torch.testing.assert_close(fast, ref, atol=1e-5, rtol=0)
        assert (ref - clean).abs().max() > 1e-3, f"{group.value}[{index}]->{target.value} changed nothing"


# The must-show runs of the group grammar over the items the families fill: GROUP[i] on the command line.
def _indexed_flows(args: list[str], run: Path, capsys) -> pd.DataFrame:
    capsys.readouterr()
    code = main(["flows", *args, *RUN, "--out", str(run.parent), "--name", run.name])
    assert code == 0, capsys.readouterr().err
    return pd.read_parquet(run / "flows.parquet")


def test_video_flows_with_frame_zero_to_last(tiny_qwen, tmp_path, capsys):
    csv = _video_set(tmp_path / "video", capsys)
    flows = _indexed_flows(["--model", str(tiny_qwen), "--data", str(csv), "-f", "frame[0]->last", "-f", "frame[1]->last"],
                           tmp_path / "runs" / "frames", capsys)
    assert len(flows) == 2 * 2 * 4
    assert flows.loc[flows["flow"] == "frame[0]->last", "rel_change"].abs().max() > 1e-3


def test_two_image_flows_with_image_one_to_question(tiny_qwen, tmp_path, capsys):
    csv = _two_image_set(tmp_path / "two")
    flows = _indexed_flows(
        ["--model", str(tiny_qwen), "--data", str(csv), "-f", "image[1]->question", "-f", "image[0]->question"],
        tmp_path / "runs" / "images", capsys,
    )
    assert len(flows) == 2 * 4
    assert flows.loc[flows["flow"] == "image[1]->question", "rel_change"].abs().max() > 1e-3


def test_groups_shows_each_image_and_frame_with_its_own_picture(tiny_qwen, tmp_path, capsys):
    """`vlmflow groups` opens the sample's images or frames as the run does, and draws each image
    group on the picture of the image or frame that holds its tokens."""
    import vlmflow

    csv = _two_image_set(tmp_path / "two")
    report = vlmflow.show_groups(tiny_qwen, csv, groups=["image", "image[1]"], out=tmp_path / "two-groups",
                                 device="cpu", dtype="float32")
    whole, second = report["image"], report["image[1]"]
    assert len(report.prepared.images) == 2 and set(second.positions) == set(report.prepared.images[1].positions)
    assert [p.name for p in whole.pictures] == ["q1-image.png", "q1-image-image1.png"]
    assert [p.name for p in second.pictures] == ["q1-image-1-image1.png"]
    assert Image.open(second.pictures[0]).size == Image.open(whole.pictures[1]).size

    csv = _video_set(tmp_path / "video", capsys)
    report = vlmflow.show_groups(tiny_qwen, csv, groups=["frame[1]"], out=tmp_path / "video-groups", device="cpu",
                                 dtype="float32")
    frame = report["frame[1]"]
    assert len(report.prepared.images) == 2 and set(frame.positions) == set(report.prepared.images[1].positions)
    assert len(frame.pictures) == 1 and frame.pictures[0].name.endswith("-image1.png")
