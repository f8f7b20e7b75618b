"""The real settings types: identity exactly as before the declarations (old run directories resume),
the options/keywords they generate, LoadSpec's family options, controls holding flow settings."""

from __future__ import annotations

import inspect
import json
import subprocess
import sys

import pytest

import vlmflow
from vlmflow.errors import ConfigError
from vlmflow.experiments.engines import ENGINES
from vlmflow.experiments.runner import DataSpec, RunSpec
from vlmflow.experiments.settings import (
    AttentionSettings,
    ControlSettings,
    Engine,
    FlowSettings,
    LensSettings,
    Readout,
)
from vlmflow.load_spec import LoadSpec, load_spec
from vlmflow.positions.groups import Flow, Group
from vlmflow.settings import SettingError, declared

DEFAULT_MODEL = {"attn_implementation": "sdpa", "dtype": "auto", "name": "m", "options": {}, "revision": None, "template": None}
CHOOSE_ATTR = {"data": "gqa:ChooseAttr", "images": None, "limit": None, "sha256": "3ecef9b8462b2098"}
QUERY_ATTR = {"data": "gqa:QueryAttr", "images": None, "limit": None, "sha256": "0a61bdd561748f9c"}
PAPER = ["question->last", "image->last", "last->last", "image->question", "related->question", "other->question"]

# (spec, its run directory name, its identity): the identities the code gave before the settings were
# declared (device, permissions and chunk sizes are not part of the identity), and the names. The names
# of runs with flows hash the identity without the flows since a run's flow set may grow (OLD_NAMES:
# the names before; such a run is found by its identity, see test_a_run_named_before_...).
CASES = {
    "flows": (
        RunSpec(
            LoadSpec("llava-hf/llava-1.5-7b-hf", dtype="float16", device="cuda:1", attn_implementation="eager",
                     revision="main", allow_hub=True, template="llava", image_mode="pad", trust_remote_code=True),
            DataSpec("gqa:ChooseAttr", images="imgs", limit=5),
            FlowSettings(flows=("image->last", "question->last"), window=9, keep_all=True, engine="reference",
                         max_new_tokens=4, max_fold_queries=64),
        ),
        "llava-1.5-7b-hf-gqa-ChooseAttr-26ec116d",
        {
            "experiment": "flows", "schema_version": 1,
            "data": {**CHOOSE_ATTR, "images": "imgs", "limit": 5},
            "model": {"attn_implementation": "eager", "dtype": "float16", "name": "llava-hf/llava-1.5-7b-hf",
                      "options": {"image_mode": "pad"}, "revision": "main", "template": "llava"},
            "settings": {"engine": "reference", "flows": ["image->last", "question->last"], "keep_all": True,
                         "max_new_tokens": 4, "window": 9},
        },
    ),
    "default": (
        RunSpec(LoadSpec("m"), DataSpec("gqa:ChooseAttr")),
        "m-gqa-ChooseAttr-e2139efa",
        {
            "experiment": "flows", "schema_version": 1, "data": CHOOSE_ATTR, "model": DEFAULT_MODEL,
            "settings": {"engine": "fast", "flows": PAPER, "keep_all": False, "max_new_tokens": 12, "window": None},
        },
    ),
    "controls": (
        RunSpec(LoadSpec("m", device="cpu"), DataSpec("gqa:QueryAttr"),
                ControlSettings(draws=3, flow_settings=FlowSettings(window=3, keep_all=True))),
        "m-gqa-QueryAttr-e0c52059",
        {
            "experiment": "controls", "schema_version": 1, "data": QUERY_ATTR, "model": DEFAULT_MODEL,
            "settings": {"draws": 3, "engine": "fast", "flows": ["random->question"], "keep_all": True,
                         "max_new_tokens": 12, "window": 3},
        },
    ),
    "lens": (
        RunSpec(LoadSpec("m"), DataSpec("gqa:QueryAttr"),
                LensSettings(readouts=(Readout.RAW,), top_k=3, groups=(Group.QUESTION,), skip_blank=False,
                             attention=AttentionSettings(targets=(Group.LAST,), max_chunk_queries=7))),
        "m-gqa-QueryAttr-72680f8f",
        {
            "experiment": "lens", "schema_version": 1, "data": QUERY_ATTR, "model": DEFAULT_MODEL,
            "settings": {
                "attention": {"sources": ["system", "image", "related", "other", "question", "suffix", "last"],
                              "targets": ["last"]},
                "groups": ["question"], "keep_all": False, "max_new_tokens": 12, "readouts": ["raw"],
                "skip_blank": False, "top_k": 3,
            },
        },
    ),
}  # fmt: skip


OLD_NAMES = {
    "flows": "llava-1.5-7b-hf-gqa-ChooseAttr-4e8abecf",
    "default": "m-gqa-ChooseAttr-ae19555a",
    "controls": "m-gqa-QueryAttr-e5e9173b",
}


@pytest.mark.parametrize("case", list(CASES))
def test_identity_and_run_name_are_as_before(case):
    """The identity and its hash are as before, so existing run directories resume: new ones are named
    ``EXPERIMENT-<the old name>``, and the old name is still found (see test_resume)."""
    spec, name, identity = CASES[case]
    assert json.loads(json.dumps(spec.identity())) == identity
    assert spec.legacy_run_name() == name
    assert spec.run_name() == f"{spec.experiment.name}-{name}"


@pytest.mark.parametrize("case", list(OLD_NAMES))
def test_a_run_named_before_flows_could_grow_is_found_by_its_identity(case, tmp_path):
    from vlmflow.experiments.run_dir import find_run_dir

    spec, name, identity = CASES[case]
    stored = {**identity, "provenance": {}}
    stored["model"] = {**identity["model"], "resolved_dtype": "float32", "fingerprint": "abc"}  # known after loading
    for folder, spec_json in ((OLD_NAMES[case], stored), (name[:-8] + "00000000", {**stored, "schema_version": 0})):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "spec.json").write_text(json.dumps(spec_json))
    assert find_run_dir(spec, tmp_path) == tmp_path / OLD_NAMES[case]
    # Another identity (here another window) is not that run.
    other = RunSpec(spec.model, spec.data, FlowSettings(window=2))
    assert find_run_dir(other, tmp_path) == tmp_path / other.run_name()


def test_where_and_with_which_permissions_a_model_runs_is_not_identity():
    a = RunSpec(LoadSpec("m", device="cpu", allow_hub=True, trust_remote_code=True), DataSpec("gqa:ChooseAttr"))
    b = RunSpec(LoadSpec("m", device="cuda"), DataSpec("gqa:ChooseAttr"), FlowSettings(max_fold_queries=8))
    assert a.identity() == b.identity()
    # image_mode and patch_rule are family options: recorded in ``options`` (identity) when set.
    assert {d.attr for d in declared(LoadSpec) if not d.identity} == {
        "device", "allow_hub", "trust_remote_code", "image_mode", "patch_rule"}


def test_image_mode_is_a_family_option():
    assert LoadSpec("m", image_mode="crop").options == (("image_mode", "crop"),)
    assert LoadSpec("m", options={"image_mode": "pad", "x": 1}).image_mode == "pad"
    assert LoadSpec("m", options=None).options == ()  # load_model(..., options=None) as before
    assert LoadSpec("m", image_mode="crop", options={"image_mode": "pad"}).options == (("image_mode", "crop"),)
    spec = load_spec(LoadSpec("m", image_mode="pad"), {"image_mode": "crop"}, "load_model")
    assert spec.image_mode == "crop" and spec.options == (("image_mode", "crop"),)
    assert hash(spec) == hash(LoadSpec("m", image_mode="crop"))  # the Ray executor keys replica pools by spec
    with pytest.raises(ConfigError, match="options must be a mapping"):
        LoadSpec("m", options=("image_mode",))


def test_load_spec_takes_a_name_or_a_spec_and_fields_by_name():
    assert load_spec("path", {"device": "cpu"}, "load_model") == LoadSpec("path", device="cpu")
    with pytest.raises(TypeError, match=r"load_model\(\) got an unexpected keyword argument 'dtyp'; valid: dtype, device"):
        load_spec("path", {"dtyp": "float16"}, "load_model")
    with pytest.raises(SettingError, match="^dtype: unknown dtype 'fp8'; valid: auto, float32, bfloat16, float16$"):
        load_spec("path", {"dtype": "fp8"}, "load_model")
    with pytest.raises(ConfigError, match="model must be a checkpoint path, a Hugging Face id, a LoadSpec"):
        load_spec(42, {}, "load_model")  # type: ignore[arg-type]


def test_controls_hold_the_flow_settings():
    control = ControlSettings(targets=("question", "last"), flow_settings=FlowSettings(window=3, engine="reference"))
    assert control.flow_settings == FlowSettings(flows=control.flows, window=3, engine=Engine.REFERENCE)
    assert control.flows == (Flow(Group.RANDOM, Group.QUESTION), Flow(Group.RANDOM, Group.LAST))
    assert control.engine is Engine.REFERENCE
    for kwargs, message in [({"draws": 0}, "draws must be >= 1, got 0"), ({"targets": ()}, "at least one target"),
                            ({"targets": ("last", "last")}, "duplicate control targets")]:
        with pytest.raises(ConfigError, match=message):
            ControlSettings(**kwargs)


def test_every_engine_has_an_implementation():
    assert set(ENGINES) == set(Engine)
    assert FlowSettings(engine="Reference").engine is Engine.REFERENCE
    with pytest.raises(SettingError, match="^engine: unknown engine 'turbo'; valid: fast, reference$"):
        FlowSettings(engine="turbo")


def test_api_keywords_are_the_declared_fields():
    parameters = inspect.signature(vlmflow.run_flows).parameters
    for key in ("dtype", "device", "attn_implementation", "revision", "allow_hub", "trust_remote_code", "template",
                "image_mode", "flows", "window", "keep_all", "engine", "max_new_tokens"):
        assert parameters[key].kind is inspect.Parameter.KEYWORD_ONLY, key
    assert parameters["dtype"].default == "auto" and parameters["window"].default is None
    lens = inspect.signature(vlmflow.run_lens).parameters
    assert {"readouts", "top_k", "groups", "attention", "literal_first_piece"} <= set(lens)
    assert "    dtype: auto, float32, bfloat16 or float16." in vlmflow.run_flows.__doc__
    with pytest.raises(TypeError, match=r"run_flows\(\) got an unexpected keyword argument 'windw'; valid: .*window"):
        vlmflow.run_flows("m", "gqa:ChooseAttr", windw=3)
    with pytest.raises(TypeError, match=r"run_lens\(\) got an unexpected keyword argument 'window'"):
        vlmflow.run_lens("m", "gqa:ChooseAttr", window=3)
    assert "device" in inspect.signature(vlmflow.load_model).parameters


def test_cli_options_are_generated_and_help_imports_no_torch():
    code = (
        "import sys\n"
        "from vlmflow.cli.main import main\n"
        "for command in ('flows', 'lens'):\n"
        "    main([command, '--help']); print('=' * 8)\n"
        "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={"COLUMNS": "200", "PATH": ""}).stdout
    assert out.strip().endswith("[]")
    flows_help, lens_help, _ = out.split("=" * 8 + "\n")
    for classes, text in (((LoadSpec, FlowSettings), flows_help), ((LoadSpec, LensSettings, AttentionSettings), lens_help)):
        for cls in classes:
            for d in declared(cls):
                for flag in d.flags:
                    assert flag.split("/")[0] in text, flag
                if d.flags:
                    assert d.help[:40] in text, d.help
