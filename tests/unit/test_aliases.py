"""Model aliases: names that stand for a checkpoint, declared by whoever ships the checkpoint."""

from __future__ import annotations

import subprocess
import sys
from importlib.metadata import EntryPoint, entry_points
from pathlib import Path

import pytest

from vlmflow import aliases
from vlmflow.aliases import ENTRY_POINT_GROUP, register_model_alias, resolve_model_name
from vlmflow.errors import ConfigError


@pytest.fixture(autouse=True)
def _fresh_registry(monkeypatch):
    monkeypatch.setattr(aliases, "_registered", {})


def test_a_registered_alias_resolves_and_other_names_pass_through(tmp_path):
    register_model_alias("mine", lambda: tmp_path / "ckpt")
    assert resolve_model_name("mine") == str(tmp_path / "ckpt")
    assert resolve_model_name("llava-hf/llava-1.5-7b-hf") == "llava-hf/llava-1.5-7b-hf"
    assert resolve_model_name(tmp_path) == str(tmp_path)
    assert resolve_model_name("not-an-alias") == "not-an-alias"


def test_a_local_folder_of_the_alias_name_wins(tmp_path, monkeypatch):
    register_model_alias("mine", lambda: "/elsewhere")
    (tmp_path / "mine").mkdir()
    monkeypatch.chdir(tmp_path)
    assert resolve_model_name("mine") == "mine"


def test_an_alias_name_is_a_plain_name():
    with pytest.raises(ConfigError, match="without '/'"):
        register_model_alias("org/model", lambda: "/x")


def test_the_organism_alias_is_an_entry_point_loaded_only_when_asked_for():
    declared = {e.name: e.value for e in entry_points(group=ENTRY_POINT_GROUP)}
    assert declared.get("organism") == "vlmflow.organism:packaged_checkpoint"
    script = (
        "import sys\n"
        "from vlmflow.aliases import resolve_model_name\n"
        "resolve_model_name('llava-hf/llava-1.5-7b-hf'); resolve_model_name('/some/folder')\n"
        "print('vlmflow.organism' in sys.modules)\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0 and done.stdout.strip() == "False", done.stderr


def test_a_missing_checkpoint_keeps_its_message(monkeypatch, tmp_path):
    from vlmflow import organism

    monkeypatch.setattr(organism, "organism_path", lambda alias="organism": tmp_path / alias)
    with pytest.raises(ConfigError) as err:
        resolve_model_name("organism")
    assert str(err.value) == (
        f"model 'organism' names the packaged organism, but {tmp_path / 'organism'} holds no checkpoint; "
        "train one with 'vlmflow organism train'"
    )


def test_an_entry_point_of_another_distribution_is_found(monkeypatch, tmp_path):
    target = tmp_path / "planted"
    module = tmp_path / "my_alias_module.py"
    module.write_text(f"def resolver():\n    return {str(target)!r}\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    entry = EntryPoint(name="my-organism", value="my_alias_module:resolver", group=ENTRY_POINT_GROUP)

    def declared(*, group: str, name: str) -> list[EntryPoint]:
        assert group == ENTRY_POINT_GROUP
        return [entry] if name == entry.name else []

    monkeypatch.setattr("importlib.metadata.entry_points", declared)
    assert resolve_model_name("my-organism") == str(target)
    assert resolve_model_name("other") == "other"


def test_load_model_resolves_an_alias(tiny_checkpoint):
    from vlmflow.loading import load_model

    path: Path = tiny_checkpoint("sp-gqa")
    register_model_alias("tiny-alias", lambda: path)
    loaded = load_model("tiny-alias", device="cpu", dtype="float32")
    assert loaded.info["model"] == str(path)
