"""Routes in whole runs, as a user runs them (the CLI in this process on a tiny model, and the shipped
organism): `vlmflow groups` prints positions a route can name, failures land at the right level with
the right exit code, and reruns compute only what is missing.

* `tokens:A:B->last`, with A:B the question's positions as `vlmflow groups` prints them, gives the
  rows of `question->last`;
* a flow a sample cannot resolve is an error for that (sample, flow), the other flows are computed;
  a flow no sample of a task can resolve is a configuration error (exit status 2, one error row
  `task:TASK`) while the other flows are computed; no kept sample or no flow row: exit status 1, and
  the (empty) tables are still written;
* `--retry-errors` recomputes what failed; adding a flow computes only that flow; a window larger
  than the model, or a layer range outside it, is refused with the valid range before any sample.
"""

from __future__ import annotations

import re
import shutil
from dataclasses import replace
from pathlib import Path

import pandas as pd
import pytest

from conftest import write_scene_task
from vlmflow.cli.main import main
from vlmflow.data.csvio import read_task_csv, write_task_csv
from vlmflow.organism import organism_path
from vlmflow.results.store import RunStore


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A saved tiny LLaVA (4 layers) and a 3-sample ChooseAttr task beside its images."""
    folder = tmp_path_factory.mktemp("routes-runs")
    csv = write_scene_task(folder / "data", n_samples=3)
    from vlmflow.tiny.llava import TinyLlavaConfig, build_tiny_llava

    build_tiny_llava(TinyLlavaConfig(), folder / "model")
    return folder / "model", csv


def said(capsys) -> str:
    """What the command wrote to stderr, with the console's line wrapping undone."""
    return " ".join(capsys.readouterr().err.split())


def flows_cli(model: Path, csv: Path, out: Path, *args: str) -> int:
    return main(["flows", "--model", str(model), "--data", str(csv), "--out", str(out), "--device", "cpu",
                 "--window", "3", "--max-new-tokens", "2", "--no-plot", *args])  # fmt: skip


def test_groups_prints_positions_a_route_can_name(tiny, tmp_path, capsys):
    model, csv = tiny
    args = ["groups", "--model", str(model), "--data", str(csv), "--sample", "00001", "--out", str(tmp_path / "png"), "--device", "cpu"]
    assert main([*args, "--group", "question", "--group", 'text:"square"', "--group", "related", "--group", "true_option - question"]) == 0
    out = capsys.readouterr().out
    question = re.search(r"^question\s+(\d+)\s+(\d+):(\d+)\s", out, re.M)
    assert question, out
    a, b = int(question.group(2)), int(question.group(3))
    assert int(question.group(1)) == b - a
    assert re.search(r'^text:"square"\s+1\s+\d+:\d+\s+▁square', out, re.M), out
    assert "true_option - question" in out and "missing: true_option - question resolves to no position" in out
    assert sorted(p.name for p in (tmp_path / "png").iterdir()) == ["00001-related.png"]
    # Every named group, missing ones with the reason.
    assert main(args) == 0
    listing = capsys.readouterr().out
    assert re.search(r"^related_in_grid\s+missing: position group 'related_in_grid' is not available", listing, re.M)

    # The question's positions as printed, written as tokens:A:B, knock out exactly question->last.
    assert flows_cli(model, csv, tmp_path / "runs", "--keep-all", "-f", "question->last", "-f", f"tokens:{a}:{b}->last") == 0
    (run,) = (tmp_path / "runs").iterdir()
    flows = RunStore.load(run).read("flows")
    one = flows[flows["sample_id"] == "00001"]
    by_route = one.pivot(index="layer", columns="flow", values="rel_change")
    pd.testing.assert_series_equal(by_route["question->last"], by_route[f"tokens:{a}:{b}->last"], check_names=False, atol=1e-6, rtol=0)
    assert by_route["question->last"].abs().max() > 1e-3


def test_failures_land_at_their_level_with_the_exit_status(tiny, tmp_path, capsys):
    model, csv = tiny
    samples = read_task_csv(csv).samples
    # Sample 00001's true option is not in its question: that flow fails for that sample only.
    odd = tmp_path / "data" / "odd_ChooseAttr.csv"
    odd.parent.mkdir()
    write_task_csv([samples[0], replace(samples[1], true_option="green"), samples[2]], odd)
    for image in csv.parent.glob("*.png"):
        shutil.copy(image, odd.parent)
    assert flows_cli(model, odd, tmp_path / "runs", "--keep-all", "-f", "true_option->last", "-f", "image->last") == 0
    (run,) = (tmp_path / "runs").iterdir()
    store = RunStore.load(run)
    errors, flows = store.read("errors"), store.read("flows")
    assert errors[["sample_id", "flow", "stage"]].values.tolist() == [["00001", "true_option->last", "groups"]]
    assert set(flows.loc[flows["sample_id"] == "00001", "flow"]) == {"image->last"}
    assert set(flows.loc[flows["sample_id"] == "00000", "flow"]) == {"image->last", "true_option->last"}

    # Nothing kept (the random model answers wrongly and --keep-all is off): exit 1, tables written.
    assert flows_cli(model, csv, tmp_path / "none", "-f", "image->last") == 1
    (empty,) = (tmp_path / "none").iterdir()
    assert pd.read_parquet(empty / "flows.parquet").empty and len(pd.read_parquet(empty / "samples.parquet")) == 3

    # Every flow failed for every kept sample: exit 1.
    only = tmp_path / "data" / "only_ChooseAttr.csv"
    write_task_csv([replace(samples[1], true_option="green")], only)
    assert flows_cli(model, only, tmp_path / "failed", "--keep-all", "-f", "true_option->last") == 1

    # Too large a window, a range outside the model: refused before any sample, naming the range.
    capsys.readouterr()
    assert flows_cli(model, csv, tmp_path / "big", "-f", "image->last", "--window", "100") == 2
    assert "window 100 does not fit the model's 4 layers; valid windows: 1..4" in said(capsys)
    assert flows_cli(model, csv, tmp_path / "big", "-f", "image->last@2-9") == 2
    assert "layer range @2-9 lies outside the model's layers; valid: A-B with 0 <= A <= B <= 3" in said(capsys)
    assert not (tmp_path / "big").exists()
    assert flows_cli(model, csv, tmp_path / "big", "-f", "image->last", "--window-style", "inverse", "--window", "4") == 2


def test_reruns_retry_errors_and_compute_only_added_flows(tiny, tmp_path):
    model, csv = tiny
    data = tmp_path / "data"
    shutil.copytree(csv.parent, data)
    missing = data / "img1.png"
    kept = missing.read_bytes()
    missing.unlink()
    task = data / csv.name
    assert flows_cli(model, task, tmp_path / "runs", "--keep-all", "-f", "image->last") == 0
    (run,) = (tmp_path / "runs").iterdir()
    store = RunStore.load(run)
    assert store.read("errors")[["sample_id", "stage"]].values.tolist() == [["00001", "image"]]
    missing.write_bytes(kept)
    # The same command recomputes nothing: the error stays.
    assert flows_cli(model, task, tmp_path / "runs", "--keep-all", "-f", "image->last") == 0
    assert RunStore.load(run).read("errors")["sample_id"].tolist() == ["00001"]
    assert flows_cli(model, task, tmp_path / "runs", "--keep-all", "-f", "image->last", "--retry-errors") == 0
    store = RunStore.load(run)
    assert store.read("errors").empty and sorted(store.read("samples")["sample_id"]) == ["00000", "00001", "00002"]
    before = store.read("flows")
    parts = {p.name for p in (run / "parts").iterdir()}

    # One more flow: the same run directory, only the new flow computed.
    assert flows_cli(model, task, tmp_path / "runs", "--keep-all", "-f", "image->last", "-f", "question->last") == 0
    assert [p.name for p in (tmp_path / "runs").iterdir()] == [run.name]
    new_parts = [p for p in (run / "parts").iterdir() if p.name not in parts]
    added = pd.concat([pd.read_parquet(p / "flows.parquet") for p in new_parts if (p / "flows.parquet").exists()])
    assert set(added["flow"]) == {"question->last"} and len(added) == 3 * 4
    assert not any((p / "samples.parquet").exists() for p in new_parts)
    after = RunStore.load(run).read("flows")
    pd.testing.assert_frame_equal(after[after["flow"] == "image->last"].reset_index(drop=True), before.reset_index(drop=True))
    spec = RunStore.load(run).spec
    assert spec["settings"]["flows"] == ["image->last", "question->last"]


ORGANISM = organism_path()
needs_organism = pytest.mark.skipif(not (ORGANISM / "config.json").is_file(), reason="the trained organism is not in the package")


@needs_organism
def test_the_organism_runs_text_and_union_routes_cumulative_with_the_sequence_metric(tmp_path, capsys):
    assert main(["organism", "scenes", str(tmp_path / "scenes"), "--per-task", "4"]) == 0
    code = main(["flows", "--model", "organism", "--data", str(tmp_path / "scenes" / "scenes_ChooseAttr.csv"),
                 "-f", 'text:"red"->last', "-f", "(related|question)->last", "--window-style", "cumulative-up",
                 "--metric", "sequence", "--out", str(tmp_path / "runs"), "--no-plot", "--device", "cpu"])  # fmt: skip
    assert code == 0, capsys.readouterr()
    (run,) = (tmp_path / "runs").iterdir()
    store = RunStore.load(run)
    flows = store.read("flows")
    assert set(flows["flow"]) == {'text:"red"->last', "(related | question)->last"}
    assert set(flows["metric"]) == {"sequence"} and set(flows["window_style"]) == {"cumulative-up"}
    assert all(list(b) == list(range(layer + 1)) for layer, b in zip(flows["layer"], flows["layers_blocked"], strict=True))
    assert (flows["n_answer_tokens"] >= 1).all() and flows["rel_change"].notna().all()
    # text:"red" is an error only for the questions without the word.
    no_red = {r.sample_id for r in store.read("samples").itertuples() if "red" not in r.question}
    assert set(store.read("errors")["sample_id"]) == no_red


@needs_organism
def test_the_query_attr_case_keeps_question_to_last(tmp_path, capsys):
    assert main(["organism", "scenes", str(tmp_path / "scenes"), "--per-task", "3"]) == 0
    data = str(tmp_path / "scenes" / "scenes_QueryAttr.csv")
    args = ["flows", "--model", "organism", "--data", data, "-f", "true_option->last", "-f", "question->last",
            "--window", "3", "--out", str(tmp_path / "runs"), "--no-plot", "--device", "cpu"]  # fmt: skip
    assert main(args) == 2
    assert "configuration error: flow true_option->last cannot be resolved for any sample of task QueryAttr" in said(capsys)
    (run,) = (tmp_path / "runs").iterdir()
    store = RunStore.load(run)
    assert set(store.read("flows")["flow"]) == {"question->last"} and len(store.read("samples")) == 3
    assert store.read("errors")[["sample_id", "flow", "stage"]].values.tolist() == [["task:QueryAttr", "true_option->last", "route"]]
    # With only the flow the data cannot serve, nothing is loaded or run.
    assert main([*args[:7], "--window", "3", "--out", str(tmp_path / "none"), "--device", "cpu"]) == 2
    assert "no flow can be resolved for any sample" in said(capsys) and not (tmp_path / "none").exists()
