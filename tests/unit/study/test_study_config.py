"""The study config: YAML and TOML read the same, bad input names the key and what is valid."""

from __future__ import annotations

from pathlib import Path

import pytest

from vlmflow.data.sample import TaskType
from vlmflow.errors import ConfigError
from vlmflow.experiments.settings import Engine, Readout
from vlmflow.load_spec import LoadSpec
from vlmflow.positions.groups import PAPER_FLOWS, Flow
from vlmflow.study.bundled import bundled_configs, resolve_config
from vlmflow.study.config import load_config, parse_config
from vlmflow.study.reproduce import planned_runs

YAML = """
name: demo
models:
  - {label: small, model: ckpt, window: 3, dtype: float32, device: cpu}
  - llava-hf/llava-1.5-7b-hf
tasks:
  - {data: tasks/ChooseAttr.csv, images: imgs, limit: 5}
  - {data: "gqa:queryattr"}
  - {synthetic: {task: ChooseRel, n: 10, seed: 3}}
flows: [image->question, related->question]
windows: {32: 7, 40: 9}
lens: {readouts: [raw]}
controls: {random_draws: 4}
statistics: {n_boot: 500}
claims: {dip: 3, middle_band: [0.2, 0.6]}
"""

TOML = """
name = "demo"
flows = ["image->question", "related->question"]
windows = {"32" = 7, "40" = 9}
lens = {readouts = ["raw"]}
controls = {random_draws = 4}
statistics = {n_boot = 500}
claims = {dip = 3, middle_band = [0.2, 0.6]}

[[models]]
label = "small"
model = "ckpt"
window = 3
dtype = "float32"
device = "cpu"

[[models]]
model = "llava-hf/llava-1.5-7b-hf"

[[tasks]]
data = "tasks/ChooseAttr.csv"
images = "imgs"
limit = 5

[[tasks]]
data = "gqa:queryattr"

[[tasks]]
synthetic = {task = "ChooseRel", n = 10, seed = 3}
"""


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    (tmp_path / "ckpt").mkdir()
    return tmp_path


def test_yaml_and_toml_give_the_same_typed_config(folder: Path):
    (folder / "s.yaml").write_text(YAML)
    (folder / "s.toml").write_text(TOML)
    a, b = load_config(folder / "s.yaml"), load_config(folder / "s.toml")
    assert a == b
    small, hub = a.models
    assert small.model == str(folder / "ckpt")  # a local checkpoint, relative to the config file
    assert hub.model == "llava-hf/llava-1.5-7b-hf" and hub.label == "llava-1.5-7b-hf"
    csv, gqa, syn = a.tasks
    assert csv.data == str(folder / "tasks/ChooseAttr.csv") and csv.images == str(folder / "imgs") and csv.limit == 5
    assert csv.label == "ChooseAttr" and gqa.label == "QueryAttr" and gqa.data == "gqa:queryattr"
    assert syn.synthetic.task is TaskType.CHOOSE_REL and syn.label == "scenes-ChooseRel"
    assert a.flows == (Flow.parse("image->question"), Flow.parse("related->question"))
    assert a.lens.readouts == (Readout.RAW,) and a.controls.random_draws == 4
    assert a.statistics.n_boot == 500 and a.claims.dip == 3.0 and a.claims.middle_band == (0.2, 0.6)
    assert a.window_for(small, 32) == 3 and a.window_for(hub, 32) == 7 and a.window_for(hub, 40) == 9
    assert a.window_for(hub, 24) == 5  # not listed: the paper's rule (about 22% of depth, odd)
    assert [e for m, t, e in planned_runs(a) if m is small and t is csv] == ["flows", "controls", "lens"]


def test_defaults_are_the_papers():
    cfg = parse_config({"models": ["m"], "tasks": ["gqa:ChooseAttr"]})
    assert cfg.flows == PAPER_FLOWS and not cfg.keep_all and cfg.lens is not None and cfg.controls is not None
    assert cfg.control_flows == (Flow.parse("related->question"),)


def test_a_model_entry_is_a_label_a_window_and_a_load_spec():
    raw = {"label": "big", "model": "org/m", "window": 5, "dtype": "bfloat16", "device": "cuda:1", "attn": "eager",
           "revision": "v2", "allow_hub": True, "template": "llava", "image_mode": "pad"}
    cfg = parse_config({"models": [raw], "tasks": ["gqa:ChooseAttr"], "engine": "reference", "controls": {"random_draws": 0}})
    entry = cfg.models[0]
    assert entry.label == "big" and entry.window == 5 and entry.model == "org/m"
    assert entry.spec == LoadSpec("org/m", dtype="bfloat16", device="cuda:1", attn_implementation="eager", revision="v2",
                                  allow_hub=True, template="llava", image_mode="pad")
    assert entry.spec.options == (("image_mode", "pad"),)
    assert cfg.engine is Engine.REFERENCE and cfg.controls is None


BAD = [
    ({"models": ["m"], "tasks": ["gqa:ChooseAttr"], "flow": []}, "unknown key 'flow'; valid: name, models, tasks, flows"),
    ({"tasks": ["gqa:ChooseAttr"]}, "missing required key 'models'"),
    ({"models": [], "tasks": ["gqa:ChooseAttr"]}, "models must not be empty"),
    ({"models": [{"model": "m", "dtype": "fp8"}], "tasks": ["gqa:ChooseAttr"]}, "models[0].dtype: unknown dtype 'fp8'; valid: auto, float32, bfloat16, float16"),
    ({"models": [{"model": "m", "widow": 3}], "tasks": ["gqa:ChooseAttr"]}, "models[0]: unknown key 'widow'; valid: label, model, window"),
    ({"models": [{"model": "m", "window": "nine"}], "tasks": ["gqa:ChooseAttr"]}, "models[0].window must be an integer, got 'nine'"),
    ({"models": [{"model": "m", "window": 0}], "tasks": ["gqa:ChooseAttr"]}, "models[0].window must be >= 1"),
    ({"models": ["a/m", "b/m"], "tasks": ["gqa:ChooseAttr"]}, "labels must be unique, m appear"),
    ({"models": ["m"], "tasks": ["gqa:ChooseColour"]}, "tasks[0].data: unknown task type 'ChooseColour'; valid: ChooseAttr"),
    ({"models": ["m"], "tasks": [{"data": "gqa:ChooseAttr", "synthetic": {"task": "ChooseAttr"}}]}, "exactly one of 'data'"),
    ({"models": ["m"], "tasks": [{"synthetic": {"task": "ChooseAttr", "count": 3}}]}, "tasks[0].synthetic: unknown key 'count'; valid: task, n, seed"),
    ({"models": ["m"], "tasks": ["gqa:ChooseAttr"], "flows": ["image->pixels"]}, "flows[0]: flow 'image->pixels': unknown position group 'pixels' at character 8; expected one of: image"),
    ({"models": ["m"], "tasks": ["gqa:ChooseAttr"], "flows": ["image-question"]}, "flows[0]: flow 'image-question': found the end at character 15; expected '->' or '<->'"),
    ({"models": ["m"], "tasks": ["gqa:ChooseAttr"], "windows": {"deep": 3}}, "windows: key 'deep' must be a number of layers"),
    ({"models": ["m"], "tasks": ["gqa:ChooseAttr"], "engine": "turbo"}, "engine: unknown engine 'turbo'; valid: fast, reference"),
    ({"models": ["m"], "tasks": ["gqa:ChooseAttr"], "keep_all": "yes"}, "keep_all must be true or false, got 'yes'"),
    ({"models": [{"model": "m", "attn": "flash_attention_2"}], "tasks": ["gqa:ChooseAttr"]}, "models[0].attn: attention implementation 'flash_attention_2' cannot take a knockout mask"),
    ({"models": [{"model": "m", "allow_hub": "yes"}], "tasks": ["gqa:ChooseAttr"]}, "models[0].allow_hub must be true or false, got 'yes'"),
    ({"models": [{"model": "m", "trust_remote_code": True}], "tasks": ["gqa:ChooseAttr"]}, "models[0]: unknown key 'trust_remote_code'; valid: label, model, window, dtype, device, attn, revision, allow_hub, template, image_mode"),
    ({"models": ["m"], "tasks": ["gqa:ChooseAttr"], "controls": {"random_draws": -1}}, "controls.random_draws must be >= 1, got -1"),
    ({"models": ["m"], "tasks": ["gqa:ChooseAttr"], "lens": {"top_k": 0}}, "lens.top_k must be >= 1, got 0"),
    ({"models": ["m"], "tasks": ["gqa:ChooseAttr"], "lens": {"readouts": []}}, "lens.readouts must not be empty"),
    ({"models": ["m"], "tasks": ["gqa:ChooseAttr"], "lens": {"readouts": ["logit"]}}, "lens.readouts[0]: unknown readout 'logit'; valid: raw, normed"),
    ({"models": ["m"], "tasks": ["gqa:ChooseAttr"], "statistics": {"n_boots": 9}}, "statistics: unknown key 'n_boots'; valid: n_boot, seed, confidence"),
    ({"models": ["m"], "tasks": ["gqa:ChooseAttr"], "statistics": {"confidence": 1.5}}, "statistics.confidence: invalid value 1.5"),
    ({"models": ["m"], "tasks": ["gqa:ChooseAttr"], "claims": {"dips": 3}}, "claims: unknown key 'dips'; valid: majority_accuracy"),
    ({"models": ["m"], "tasks": ["gqa:ChooseAttr"], "claims": {"dip": "big"}}, "claims.dip must be a number, got 'big'"),
    ({"models": ["m"], "tasks": ["gqa:ChooseAttr"], "report": {"figure_format": "gif"}}, "report.figure_format: invalid value 'gif'"),
    ({"models": ["m"], "tasks": ["gqa:ChooseAttr"], "flows": [], "lens": False}, "the study runs nothing"),
    ({"models": [{"model": "m", "label": "a b"}], "tasks": ["gqa:ChooseAttr"]}, "models[0].label 'a b' may only hold"),
    (["m"], "config must be a mapping"),
]


@pytest.mark.parametrize(("raw", "message"), BAD, ids=[m[:40] for _, m in BAD])
def test_bad_configs_name_the_key_and_the_valid_values(raw, message):
    with pytest.raises(ConfigError) as info:
        parse_config(raw)
    assert message in str(info.value)


def test_unset_environment_variable_is_named(monkeypatch, tmp_path: Path):
    monkeypatch.delenv("VLMFLOW_TEST_IMAGES", raising=False)
    raw = {"models": ["m"], "tasks": [{"data": "gqa:ChooseAttr", "images": "$VLMFLOW_TEST_IMAGES/val"}]}
    with pytest.raises(ConfigError, match="tasks\\[0\\].images: environment variable 'VLMFLOW_TEST_IMAGES'"):
        parse_config(raw)
    monkeypatch.setenv("VLMFLOW_TEST_IMAGES", str(tmp_path))
    assert parse_config(raw).tasks[0].images == f"{tmp_path}/val"


def test_unreadable_files(tmp_path: Path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    (tmp_path / "s.json").write_text("{}")
    with pytest.raises(ConfigError, match="unknown format '.json'; valid: .yaml, .yml, .toml"):
        load_config(tmp_path / "s.json")
    (tmp_path / "s.yaml").write_text("models: [m\n")
    with pytest.raises(ConfigError, match="is not valid YAML"):
        load_config(tmp_path / "s.yaml")
    (tmp_path / "s.toml").write_text("models = [\n")
    with pytest.raises(ConfigError, match="is not valid TOML"):
        load_config(tmp_path / "s.toml")


def test_bundled_paper_config_parses_as_the_papers_grid(monkeypatch, tmp_path: Path):
    monkeypatch.setenv("GQA_IMAGES", str(tmp_path))
    cfg = load_config(resolve_config("paper"))
    assert [m.model for m in cfg.models] == [
        "llava-hf/llava-1.5-7b-hf",
        "llava-hf/llava-1.5-13b-hf",
        "llava-hf/llava-v1.6-vicuna-7b-hf",
        "llava-hf/llama3-llava-next-8b-hf",
    ]
    assert [t.data for t in cfg.tasks] == [f"gqa:{t.value}" for t in TaskType]
    assert all(t.images == str(tmp_path) for t in cfg.tasks)
    assert cfg.flows == PAPER_FLOWS and cfg.windows == {32: 7, 40: 9} and not cfg.keep_all
    assert len(planned_runs(cfg)) == 4 * 6 * 3


def test_bundled_organism_config_parses():
    cfg = load_config(bundled_configs()["organism"])
    assert [m.model for m in cfg.models] == ["organism", "organism-planted"]
    assert [m.window for m in cfg.models] == [None, 1]
    assert {t.synthetic.task for t in cfg.tasks} == set(TaskType)


def test_unknown_config_name_lists_the_bundled_ones():
    with pytest.raises(ConfigError, match="bundled: organism, paper"):
        resolve_config("no-such-study")
