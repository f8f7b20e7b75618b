"""Loading is safe by default: weights only from safetensors, no code from a checkpoint unless the
user asks, and no network unless the user allows the hub."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from unittest import mock

import pytest
import torch
from safetensors.torch import load_file

from conftest import make_scene_sample
from vlmflow.data.csvio import write_task_csv
from vlmflow.errors import ConfigError
from vlmflow.loading import load_model


@pytest.fixture()
def one_sample_csv(tmp_path) -> Path:
    sample, image = make_scene_sample()
    image.save(tmp_path / "img1.png")
    write_task_csv([sample], tmp_path / "ChooseAttr.csv")
    return tmp_path / "ChooseAttr.csv"


def test_a_checkpoint_with_pickle_weights_only_is_refused_without_unpickling(tiny_checkpoint, tmp_path):
    source = tiny_checkpoint("sp-gqa")
    pickled = tmp_path / "bin-only"
    shutil.copytree(source, pickled)
    state = load_file(pickled / "model.safetensors")
    (pickled / "model.safetensors").unlink()
    torch.save(state, pickled / "pytorch_model.bin")
    with mock.patch("torch.load", side_effect=AssertionError("torch.load must not be called")), pytest.raises(ConfigError) as info:
        load_model(pickled, device="cpu")
    message = str(info.value)
    assert f"checkpoint {str(pickled)!r} has weights only in pickle files (pytorch_model.bin)" in message
    assert "vlmflow reads weights only from .safetensors files" in message
    # The same directory with safetensors weights beside the pickle file loads (from safetensors).
    shutil.copy(source / "model.safetensors", pickled / "model.safetensors")
    with mock.patch("torch.load", side_effect=AssertionError("torch.load must not be called")):
        assert load_model(pickled, device="cpu").family.family == "llava"


def _remote_code_checkpoint(source: Path, target: Path) -> Path:
    """A copy of ``source`` whose config needs the checkpoint's own Python code, which leaves a mark."""
    shutil.copytree(source, target)
    config = json.loads((target / "config.json").read_text())
    config["model_type"] = "marked_llava"  # not a transformers model type: only the shipped code knows it
    config["auto_map"] = {"AutoConfig": "configuration_marked.MarkedConfig"}
    (target / "config.json").write_text(json.dumps(config))
    (target / "configuration_marked.py").write_text(
        textwrap.dedent(
            """
            import os
            import pathlib

            from transformers import LlavaConfig

            pathlib.Path(os.environ["VLMFLOW_TEST_MARKER"]).write_text("the checkpoint's code ran")


            class MarkedConfig(LlavaConfig):
                model_type = "marked_llava"
            """
        )
    )
    return target


def test_checkpoint_code_does_not_run_unless_asked(tiny_checkpoint, tmp_path, monkeypatch, one_sample_csv, capsys):
    from vlmflow.cli.main import main

    marker = tmp_path / "marker"
    monkeypatch.setenv("VLMFLOW_TEST_MARKER", str(marker))
    model = _remote_code_checkpoint(tiny_checkpoint("sp-gqa"), tmp_path / "remote-code")
    code = main(["flows", "--model", str(model), "--data", str(one_sample_csv), "--out", str(tmp_path / "runs"), "--device", "cpu"])
    message = " ".join(capsys.readouterr().err.split())
    assert code == 2
    assert f"cannot load model config from {str(model)!r} (the checkpoint ships its own Python code; pass" in message
    assert "--trust-remote-code only if you trust it)" in message
    assert not marker.exists()
    assert not (tmp_path / "runs").exists()

    # The flag reaches the loader (the code itself runs in the subprocess test below).
    seen = {}

    def fake_load(spec):
        seen.update(trust_remote_code=spec.trust_remote_code, allow_hub=spec.allow_hub)
        raise ConfigError("stop here")

    monkeypatch.setattr("vlmflow.experiments.runner.load_model", fake_load)
    args = ["flows", "--model", str(model), "--data", str(one_sample_csv), "--out", str(tmp_path / "runs"), "--device", "cpu"]
    assert main(args) == 2 and seen["trust_remote_code"] is False and seen["allow_hub"] is False
    assert main([*args, "--trust-remote-code"]) == 2 and seen["trust_remote_code"] is True


_NETWORK_PROBE = textwrap.dedent(
    """
    import json, socket, sys

    attempts = []

    def refuse(*args, **kwargs):
        attempts.append(repr(args[:2])[:80])
        raise OSError("network access is blocked in this test")

    socket.getaddrinfo = refuse
    socket.create_connection = refuse
    socket.socket.connect = lambda self, *a, **k: refuse(*a)
    socket.socket.connect_ex = lambda self, *a, **k: refuse(*a)

    from vlmflow.cli.main import main

    import urllib.request

    try:  # the probe sees a connection attempt (so zero attempts below means none was made)
        urllib.request.urlopen("https://huggingface.co", timeout=5)
    except OSError:
        pass
    results = {"probe": {"attempts": len(attempts)}}
    base = json.loads(sys.argv[1])
    for label, extra in json.loads(sys.argv[2]).items():
        del attempts[:]
        code = main(base + extra)
        results[label] = {"code": code, "attempts": len(attempts)}
    print("RESULT " + json.dumps(results))
    """
)


@pytest.mark.slow  # a CLI subprocess: over 3 s
def test_nothing_reaches_the_network_without_allow_hub_and_checkpoint_code_runs_only_when_asked(
    tiny_checkpoint, tmp_path, one_sample_csv
):
    """Run in a fresh process with the offline variables unset and an empty hub cache."""
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    env.update(HF_HOME=str(tmp_path / "hf-home"), VLMFLOW_TEST_MARKER=str(tmp_path / "marker"), OMP_NUM_THREADS="1")
    remote = _remote_code_checkpoint(tiny_checkpoint("sp-gqa"), tmp_path / "remote-code")
    base = ["flows", "--data", str(one_sample_csv), "--out", str(tmp_path / "runs"), "--device", "cpu", "--no-plot",
            "--flow", "image->last", "--keep-all", "--max-new-tokens", "1"]
    scenarios = {
        "offline": ["--model", "no-such-org/no-such-model"],
        "remote_code": ["--model", str(remote), "--trust-remote-code"],
    }
    done = subprocess.run(
        [sys.executable, "-c", _NETWORK_PROBE, json.dumps(base), json.dumps(scenarios)],
        env=env, capture_output=True, text=True, timeout=300,
    )
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    assert lines, done.stdout + done.stderr
    results = json.loads(lines[0][len("RESULT "):])
    stderr = " ".join(done.stderr.split())
    # Offline: a clear error and not a single connection attempt.
    assert results["offline"] == {"code": 2, "attempts": 0}, stderr
    assert "cannot load model config from 'no-such-org/no-such-model' (offline mode: pass allow_hub=True / --allow-hub" in stderr
    assert results["probe"]["attempts"] >= 1
    assert "Traceback" not in stderr
    # With --trust-remote-code the checkpoint's own code runs (and nothing reaches the network).
    assert (tmp_path / "marker").read_text() == "the checkpoint's code ran"
    assert results["remote_code"]["attempts"] == 0, stderr
