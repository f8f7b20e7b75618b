"""A newcomer's first hour, through the real command line in a separate process (``python -m vlmflow``).

One test (or a few) per problem a new user met: usage errors in one line, forgiving reruns of the
demo, Ctrl-C and resume messages and the run directory's lock, quiet output, messages that say what
is wrong, figures and summaries a student can read, and the demo's report.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from support.dataset import write_scene_dataset
from support.runs import write_flows_run, write_lens_run
from vlmflow.results.store import PARTS_DIR

#: A one-sample-per-second-ish flows run on a tiny model (two flows, no figure).
FLOW_ARGS = ["--flow", "image->last", "--flow", "question->last", "--keep-all", "--max-new-tokens", "2", "--device", "cpu"]


def vlmflow(*args: str, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    """``vlmflow ARGS`` in a fresh process (its exit status is for the test to check)."""
    return subprocess.run(
        [sys.executable, "-m", "vlmflow", *args], cwd=cwd, capture_output=True, text=True, timeout=timeout, env=_env()
    )


def _env() -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1", "COLUMNS": "80"}


def _lines(done: subprocess.CompletedProcess) -> list[str]:
    return [line for line in (done.stdout + done.stderr).splitlines() if line.strip()]


def _assert_usage_error(done: subprocess.CompletedProcess, *expected: str) -> None:
    text = done.stdout + done.stderr
    assert done.returncode == 2, text
    assert "Traceback" not in text, text
    assert len(_lines(done)) <= 3, text
    for part in expected:
        assert part in text, text


# --- 1. usage errors: one line, "did you mean", exit 2; --version; examples; consistent option names ---------


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["flows"], ["error: missing option '--model'", "see 'vlmflow flows --help'"]),
        (["flows", "-m", "x", "-d", "y", "--window", "abc"], ["invalid value for '--window'", "'abc' is not an integer"]),
        (["flwos"], ["no such command 'flwos' (did you mean 'flows'?)"]),
        (["flows", "--windw", "3", "-m", "x", "-d", "y"], ["no such option '--windw' (did you mean '--window'"]),
        (["gqa", "bild"], ["no such command 'bild' (did you mean 'build'?)", "see 'vlmflow gqa --help'"]),
        (["flows", "-m", "x", "-d", "y", "--engine", "turbo"], ["--engine: unknown engine 'turbo'; valid: fast, reference"]),
        (["plot"], ["missing argument 'RUN_DIR'"]),
    ],
)
def test_a_usage_error_is_one_line_with_exit_status_2(args, expected, tmp_path):
    _assert_usage_error(vlmflow(*args, cwd=tmp_path), *expected)


def test_version_and_bare_vlmflow(tmp_path):
    version = vlmflow("--version", cwd=tmp_path)
    assert version.returncode == 0 and version.stdout.startswith("vlmflow ") and len(_lines(version)) == 1
    assert vlmflow("-V", cwd=tmp_path).stdout == version.stdout
    bare = vlmflow(cwd=tmp_path)  # the help page, as git and click do, with the usage status
    assert bare.returncode == 2 and "Traceback" not in bare.stdout + bare.stderr
    assert "Usage: vlmflow" in bare.stdout and "demo" in bare.stdout and "Examples" in bare.stdout


def test_every_help_page_has_an_example_and_no_type_placeholders(tmp_path):
    """Every command's ``--help`` (all pages in one process, each through the CLI's entry)."""
    script = (
        "import sys; from vlmflow.cli.main import command, main; from vlmflow.cli.usage import walk_commands\n"
        "for path, _ in walk_commands(command()):\n"
        "    print('=== ' + ' '.join(path), flush=True); sys.stdout.flush()\n"
        "    print('status', main([*path, '--help']), flush=True)\n"
    )
    done = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, env=_env(), timeout=300)
    assert done.returncode == 0, done.stderr
    pages = {name: text for name, text in ((p.split("\n", 1)[0].strip(), p) for p in done.stdout.split("=== ")[1:])}
    assert {"", "flows", "lens", "plot", "demo", "gqa build", "organism train", "report"} <= set(pages), sorted(pages)
    for name, page in pages.items():
        assert "status 0" in page, (name, page)
        assert "Examples:" in page and "vlmflow " in page.split("Examples:")[1], (name, page)
        assert not any(t in page for t in ("<bool>", "<list[", "<str>", "<int>", "<path>")), (name, page)
    assert "WINDOW" in pages["flows"] and "--keep-all" in pages["flows"]
    assert vlmflow("flows", "-h", cwd=tmp_path).stdout == vlmflow("flows", "--help", cwd=tmp_path).stdout


@pytest.mark.slow  # a CLI subprocess: over 3 s
def test_old_option_spellings_still_work_with_a_note(tmp_path):
    """``-f`` is ``--flow`` wherever it exists; plot's ``-f`` (format) and report's ``--formats`` still work."""
    write_flows_run(tmp_path / "run", data="a.csv")
    done = vlmflow("plot", "run", "-f", "svg", "--out", "figs", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "note: 'vlmflow plot -f' is deprecated; use --format" in done.stderr
    assert sorted(p.name for p in (tmp_path / "figs").iterdir()) == ["flows_ChooseAttr.svg"]
    assert "-f" not in vlmflow("plot", "--help", cwd=tmp_path).stdout.split("--format")[0].split("--out")[1]
    report = vlmflow("report", "no-study", "--formats", "svg", cwd=tmp_path)
    assert "note: 'vlmflow report --formats' is deprecated; use --format" in report.stderr
    _assert_usage_error(report, "is not a study directory")


# --- 2 and 7. the demo: reruns with other options, its own folder, report.html --------------------------------


@pytest.mark.slow  # a CLI subprocess: over 3 s
def test_the_demo_refuses_a_folder_it_did_not_write(tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("do not touch")
    _assert_usage_error(vlmflow("demo", "--out", "mine", cwd=tmp_path), "'mine' is not empty and was not written by vlmflow demo")
    assert sorted(p.name for p in mine.iterdir()) == ["thesis.tex"]  # not even a lock file left


@pytest.mark.slow
def test_demo_then_demo_with_other_options_replaces_its_runs_and_writes_a_report(tmp_path):
    first = vlmflow("demo", "--per-task", "1", "--out", "demo", cwd=tmp_path, timeout=900)
    assert first.returncode == 0, first.stderr
    assert "report: demo/report.html" in first.stdout
    page = (tmp_path / "demo" / "report.html").read_text()
    assert "What to notice" in page and "data:image/png;base64," in page
    assert "http://" not in page and "https://" not in page and "<script src" not in page  # self-contained
    assert "-0 @" not in page and "no drop" in page  # a flat flow is "no drop", not a layer
    second = vlmflow("demo", "--per-task", "2", "--out", "demo", "--no-plot", cwd=tmp_path, timeout=900)
    assert second.returncode == 0, second.stderr
    assert "replacing the earlier demo there (it ran with other options: per_task 1 -> 2)" in second.stderr
    summary = json.loads((tmp_path / "demo" / "summary.json").read_text())
    assert {task["samples"] for task in summary["tasks"].values()} == {2}
    assert "holds a different run" not in second.stderr and "sha256" not in second.stderr


# --- 3. Ctrl-C, resuming, and one process per run directory ----------------------------------------------------


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_scene_dataset(tmp_path_factory.mktemp("first-hour-data"), 12)


def _parts(run: Path) -> int:
    parts = run / PARTS_DIR
    return len([p for p in parts.iterdir() if not p.name.startswith(".")]) if parts.is_dir() else 0


@pytest.mark.slow
def test_ctrl_c_says_how_far_the_run_got_and_the_rerun_says_it_resumes(tiny_checkpoint, data, tmp_path):
    model = tiny_checkpoint("sp-gqa")
    args = ["flows", "-m", str(model), "-d", str(data), "--out", "runs", "--name", "r", "--no-plot", *FLOW_ARGS]
    proc = subprocess.Popen(
        [sys.executable, "-m", "vlmflow", *args], cwd=tmp_path, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    run = tmp_path / "runs" / "r"
    deadline = time.monotonic() + 300
    while _parts(run) < 2 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "Traceback" not in err
    done = _parts(run)  # one committed part per sample (the data file has no bad lines)
    assert 2 <= done < 12, err
    assert f"interrupted after {done} of 12 samples of 'runs/r'; rerun the same command to resume" in err
    resumed = vlmflow(*args, cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming runs/r: {done} of 12 samples already done" in resumed.stderr
    assert json.loads((run / "summary.json").read_text())["samples"] == 12


def _hold_lock(run: Path) -> subprocess.Popen:
    """Another process that takes the run directory's lock and keeps it until killed."""
    code = (
        "import sys, time; from vlmflow.results.lock import RunLock; "
        f"RunLock({str(run)!r}).acquire(); print('held', flush=True); time.sleep(600)"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, env=_env())
    assert proc.stdout is not None and proc.stdout.readline().strip() == "held"
    return proc


@pytest.mark.slow
def test_a_second_process_on_a_run_directory_refuses_naming_the_holder_until_it_is_killed(tiny_checkpoint, data, tmp_path):
    model = tiny_checkpoint("sp-gqa")
    args = ["flows", "-m", str(model), "-d", str(data), "--out", "runs", "--name", "r", "--no-plot", "--limit", "1", *FLOW_ARGS]
    run = tmp_path / "runs" / "r"
    holder = _hold_lock(run)
    try:
        refused = vlmflow(*args, cwd=tmp_path)
        _assert_usage_error(refused, f"run directory 'runs/r' is in use by pid {holder.pid} on host {socket.gethostname()} since ")
        assert not (run / "spec.json").exists()  # it computed nothing
    finally:
        holder.send_signal(signal.SIGKILL)  # as kill -9: the lock file stays behind
        holder.wait(timeout=30)
    assert (run / ".lock").is_file()
    taken = vlmflow(*args, cwd=tmp_path)
    assert taken.returncode == 0, taken.stderr
    assert f"the lock of pid {holder.pid} on host {socket.gethostname()}" in taken.stderr and "is stale" in taken.stderr
    assert not (run / ".lock").exists()  # released when done


# --- 4. quiet output -------------------------------------------------------------------------------------------


def test_no_bar_or_library_noise_before_or_around_an_error(tiny_checkpoint, data, tmp_path):
    model = tiny_checkpoint("sp-gqa")
    done = vlmflow("flows", "-m", str(model), "-d", str(data), "--images", "no-such-folder", *FLOW_ARGS, cwd=tmp_path)
    _assert_usage_error(done, "images folder 'no-such-folder' does not exist")
    assert len(_lines(done)) == 1  # the error alone: no "running 0/?" bar


@pytest.mark.slow
def test_loading_is_quiet_unless_verbose_and_the_api_bar_counts_samples(tiny_checkpoint, data, tmp_path):
    model = tiny_checkpoint("sp-gqa")
    args = ["flows", "-m", str(model), "-d", str(data), "--limit", "1", "--no-plot", *FLOW_ARGS]
    quiet = vlmflow(*args, "--name", "quiet", cwd=tmp_path)
    assert quiet.returncode == 0, quiet.stderr
    assert "Loading weights" not in quiet.stderr and "0/?" not in quiet.stderr
    verbose = vlmflow(*args, "--name", "verbose", "--verbose", cwd=tmp_path)
    assert verbose.returncode == 0 and "Loading weights" in verbose.stderr  # transformers' own bar, when asked for
    script = (
        f"import vlmflow; vlmflow.run_flows(model={str(model)!r}, data={str(data)!r}, limit=1, keep_all=True, device='cpu', "
        "max_new_tokens=2, flows=['image->last'], out='api', progress=True)"
    )
    api = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, env=_env(), timeout=300)
    assert api.returncode == 0, api.stderr
    # The bar before its first sample read "vlmflow: 0sample"; a rate such as "14.60sample/s" is fine.
    assert not re.search(r"(?<![\d.])0 ?sample(?!/s)", api.stderr) and "Loading weights" not in api.stderr
    assert "1/1" in api.stderr


# --- 5. messages that say what is wrong ------------------------------------------------------------------------


@pytest.mark.slow  # a CLI subprocess: over 3 s
def test_a_mistyped_model_path_and_an_out_file(tiny_checkpoint, data, tmp_path):
    model = tiny_checkpoint("sp-gqa")
    (tmp_path / "models" / "tiny").mkdir(parents=True)
    _assert_usage_error(
        vlmflow("flows", "-m", "models/tniy", "-d", str(data), cwd=tmp_path), "no such directory: 'models/tniy' (did you mean 'models/tiny'?)"
    )
    _assert_usage_error(vlmflow("flows", "-m", "./tniy", "-d", str(data), cwd=tmp_path), "no such directory: './tniy'")
    (tmp_path / "results.txt").write_text("my notes")
    _assert_usage_error(
        vlmflow("flows", "-m", str(model), "-d", str(data), "--out", "results.txt", cwd=tmp_path),
        "output folder 'results.txt' is a file, not a folder",
    )
    assert (tmp_path / "results.txt").read_text() == "my notes"


@pytest.mark.slow
def test_a_flows_run_on_other_data_never_replaces_a_good_figure(tmp_path):
    lens = write_lens_run(tmp_path / "lens", data="a.csv")
    write_flows_run(tmp_path / "flows-a", data="a.csv")
    write_flows_run(tmp_path / "flows-b", data="b.csv")
    assert vlmflow("plot", "lens", "--flows-run", "flows-a", "--format", "png", cwd=tmp_path).returncode == 0
    good = (lens / "figures" / "flows_over_lens.png").read_bytes()
    done = vlmflow("plot", "lens", "--flows-run", "flows-b", "--format", "png", cwd=tmp_path)
    _assert_usage_error(done, "flows run 'flows-b' is over other data than lens run 'lens'")
    assert (lens / "figures" / "flows_over_lens.png").read_bytes() == good  # the good figure is kept


# --- 6. figures, summaries and run folder names ------------------------------------------------------------------


@pytest.mark.slow
def test_run_folders_say_the_experiment_and_old_names_still_resume(tiny_checkpoint, data, tmp_path):
    model = tiny_checkpoint("sp-gqa")
    common = ["-m", str(model), "-d", str(data), "--limit", "1", "--keep-all", "--max-new-tokens", "2", "--device", "cpu"]
    flows = vlmflow("flows", *common, "--flow", "image->last", "--no-plot", cwd=tmp_path)
    lens = vlmflow("lens", *common, "--no-plot", cwd=tmp_path)
    assert flows.returncode == 0 and lens.returncode == 0, flows.stderr + lens.stderr
    names = sorted(p.name for p in (tmp_path / "runs").iterdir())
    assert [n.split("-")[0] for n in names] == ["flows", "lens"], names
    # A run directory written under the old name (no experiment prefix) is found and resumed.
    old = tmp_path / "runs" / names[0].removeprefix("flows-")
    (tmp_path / "runs" / names[0]).rename(old)
    again = vlmflow("flows", *common, "--flow", "image->last", "--no-plot", cwd=tmp_path)
    assert again.returncode == 0 and f"runs/{old.name} is complete" in again.stderr, again.stderr
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == sorted([old.name, names[1]])


@pytest.mark.slow  # a CLI subprocess: over 3 s
def test_plotted_figures_and_heat_map_labels(tmp_path):
    lens = write_lens_run(tmp_path / "lens", data="a.csv", groups=("question",))
    done = vlmflow("plot", "lens", "--format", "png", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert {"lens_raw.png", "lens_normed.png", "lens_question_positions.png"} <= {p.name for p in (lens / "figures").iterdir()}
