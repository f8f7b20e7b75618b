"""Settings declared once: one `setting(...)` line is a CLI option, an API keyword, a config key and
(if declared so) part of the identity; values are checked in the settings type, errors name the value."""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from enum import StrEnum

import pytest
import typer
from typer.testing import CliRunner

from vlmflow.errors import ConfigError
from vlmflow.positions.groups import Flow, Group
from vlmflow.settings import (
    SettingError,
    Settings,
    build,
    declared,
    read_config,
    read_value,
    setting,
)
from vlmflow.settings_keywords import route_keywords, settings_keywords


class Colour(StrEnum):
    RED = "red"
    BLUE = "blue"


@dataclass(frozen=True)
class Inner(Settings):
    groups: tuple[Group, ...] = setting((Group.LAST,), flags=("--inner-group",), help="Inner groups (repeatable).")


@dataclass(frozen=True)
class Throwaway(Settings):
    """A settings type that exists only in this test: every consumer must pick up its fields."""

    size: int = setting(3, flags=("--size", "-s"), minimum=1, help="How many.")
    colour: Colour = setting(Colour.RED, help="red or blue.")
    flows: tuple[Flow, ...] = setting((), flags=("--flow",), help="Flows (repeatable).")
    label: str | None = setting(None, config="name", help="A label.")
    fast_path: bool = setting(True, key="slow_path", invert=True, help="Take the slow path.")
    seed: int = setting(0, identity=False, flags=None, config=False, help="Not on the CLI, not in configs, not identity.")
    inner: Inner | None = setting(None, flags=("--inner/--no-inner",), help="Also the inner settings.")


def test_declarations_are_read_once_with_their_names():
    by_attr = {d.attr: d for d in declared(Throwaway)}
    assert by_attr["size"].flags == ("--size", "-s") and by_attr["colour"].flags == ("--colour",)
    assert by_attr["label"].config == "name" and by_attr["seed"].config is None and by_attr["seed"].flags == ()
    assert by_attr["fast_path"].key == "slow_path" and by_attr["fast_path"].user_default is False
    assert by_attr["flows"].many and by_attr["flows"].item is Flow and by_attr["label"].optional
    assert by_attr["inner"].nested is Inner


def test_values_are_parsed_and_checked_in_the_type():
    t = Throwaway(colour="blue", flows=["image->last"], label="  x ", inner=True)
    assert t.colour is Colour.BLUE and t.flows == (Flow(Group.IMAGE, Group.LAST),) and t.label == "x"
    assert t.inner == Inner()
    bad = [
        ({"size": 0}, "size must be >= 1, got 0"),
        ({"size": True}, "size must be an integer, got True"),
        ({"colour": "green"}, "colour: unknown value 'green'; valid: red, blue"),
        ({"flows": ["image->last", "pixels->last"]}, "flows[1]: flow 'pixels->last': unknown position group 'pixels' at character 1"),
        ({"flows": "image->last"}, "flows must be a list, got 'image->last'"),
        ({"label": ""}, "label must be a non-empty string"),
        ({"fast_path": "no"}, "fast_path must be true or false, got 'no'"),
        ({"inner": 3}, "inner must be true, false or Inner(...), got 3"),
    ]
    for kwargs, message in bad:
        with pytest.raises(SettingError) as info:
            Throwaway(**kwargs)
        assert message in str(info.value), kwargs


def test_identity_is_what_the_fields_declare():
    t = Throwaway(size=4, flows=["image->last"], seed=9, inner=True)
    assert t.identity() == {
        "size": 4, "colour": "red", "flows": ["image->last"], "label": None, "fast_path": True,
        "inner": {"groups": ["last"]},
    }  # fmt: skip
    assert Throwaway(seed=1).identity() == Throwaway(seed=2).identity()


def test_a_field_declared_once_is_a_cli_option():
    app = typer.Typer()
    got = {}

    from vlmflow.cli.options import settings_options

    @app.command()
    @settings_options(options=Throwaway)
    def command(*, name: str = typer.Option("n", "--name"), options: Throwaway) -> None:
        got["options"], got["name"] = options, name

    runner = CliRunner()
    result = runner.invoke(app, ["-s", "5", "--colour", "blue", "--flow", "image->last", "--slow-path", "--inner-group", "question"])
    assert result.exit_code == 0, result.output
    assert got["options"] == Throwaway(size=5, colour=Colour.BLUE, flows=("image->last",), fast_path=False, inner=Inner((Group.QUESTION,)))
    result = runner.invoke(app, [])
    assert result.exit_code == 0 and got["options"] == Throwaway() and got["name"] == "n"
    assert runner.invoke(app, ["--inner"]).exit_code == 0 and got["options"].inner == Inner()
    help_text = runner.invoke(app, ["--help"], terminal_width=200).output
    for flag in ("--size", "-s", "--colour", "--flow", "--label", "--slow-path", "--inner", "--inner-group"):
        assert flag in help_text
    assert "--seed" not in help_text and "How many." in help_text
    result = runner.invoke(app, ["--flow", "pixels->last"])
    assert isinstance(result.exception, SettingError) and str(result.exception).startswith("--flow: flow 'pixels->last': unknown position group 'pixels' at character 1")


def test_generated_options_may_not_clash_with_the_commands_own():
    from vlmflow.cli.options import settings_options

    with pytest.raises(TypeError, match="clash with its parameters: size"):

        @settings_options(options=Throwaway)
        def command(*, size: int = 1, options: Throwaway) -> None: ...


def test_a_field_declared_once_is_an_api_keyword():
    @settings_keywords(Throwaway)
    def run(data: str, *, options: Throwaway | None = None, **keywords: object) -> Throwaway:
        """Run something."""
        (fields,) = route_keywords("run", keywords, Throwaway)
        return build(Throwaway, fields, base=options or Throwaway())

    assert run("d", size=2, slow_path=True) == Throwaway(size=2, fast_path=False)
    assert run("d", options=Throwaway(size=7), colour="blue") == Throwaway(size=7, colour=Colour.BLUE)
    parameters = inspect.signature(run).parameters
    assert list(parameters) == ["data", "options", "size", "colour", "flows", "label", "slow_path", "seed", "inner"]
    assert parameters["size"].default == 3 and parameters["slow_path"].default is False
    assert "        size: How many." in run.__doc__ and "        slow_path: Take the slow path." in run.__doc__
    with pytest.raises(TypeError, match="run\\(\\) got an unexpected keyword argument 'sise'; valid: size, colour, flows"):
        run("d", sise=2)
    with pytest.raises(ConfigError, match="^slow_path must be true or false, got 'yes'"):
        run("d", slow_path="yes")


def test_a_field_declared_once_is_a_config_key():
    t = read_config(Throwaway, {"size": 2, "name": "x", "slow_path": True, "inner": {"groups": ["image"]}}, "section")
    assert t == Throwaway(size=2, label="x", fast_path=False, inner=Inner((Group.IMAGE,)))
    with pytest.raises(ConfigError, match=r"^section: unknown key 'seed'; valid: size, colour, flows, name, slow_path, inner$"):
        read_config(Throwaway, {"seed": 1}, "section")
    with pytest.raises(ConfigError, match=r"^section\.size must be >= 1, got 0$"):
        read_config(Throwaway, {"size": 0}, "section")
    with pytest.raises(ConfigError, match=r"^section\.flows\[0\]: flow 'image': found the end at character 6; expected '->' or '<->'"):
        read_config(Throwaway, {"flows": ["image"]}, "section")
    with pytest.raises(ConfigError, match=r"^inner\.groups\[0\]: unknown position group 'pixels'"):
        read_config(Throwaway, {"inner": {"groups": ["pixels"]}}, "")
    assert read_value(Throwaway, "colour", "blue", "x.colour") is Colour.BLUE
    with pytest.raises(ConfigError, match=r"^models\[2\]\.size must be an integer, got 'big'$"):
        read_value(Throwaway, "size", "big", "models[2].size")


def test_identity_kinds_if_set_and_grows():
    from vlmflow.experiments.runner import DataSpec, RunSpec
    from vlmflow.experiments.settings import FlowSettings, Metric, WindowStyle
    from vlmflow.load_spec import LoadSpec
    from vlmflow.settings import growing

    paper = FlowSettings()
    assert "metric" not in paper.identity() and "window_style" not in paper.identity()  # runs written before: same identity
    sequence = FlowSettings(metric="sequence", window_style="cumulative-up")
    assert sequence.identity()["metric"] == "sequence" and sequence.identity()["window_style"] == "cumulative-up"
    assert sequence.metric is Metric.SEQUENCE and sequence.window_style is WindowStyle.CUMULATIVE_UP
    assert growing(paper) == ("flows",)
    # The run directory's name leaves out what may grow: more flows find the same run.
    one = RunSpec(LoadSpec("m"), DataSpec("gqa:ChooseAttr"), FlowSettings(flows=["image->last"]))
    two = RunSpec(LoadSpec("m"), DataSpec("gqa:ChooseAttr"), FlowSettings(flows=["image->last", "question->last"]))
    assert one.run_name() == two.run_name() and one.identity() != two.identity()
    assert RunSpec(LoadSpec("m"), DataSpec("gqa:ChooseAttr"), sequence).run_name() != one.run_name()


def test_keep_only_mode_marks_every_flow():
    from vlmflow.experiments.settings import FlowSettings

    settings = FlowSettings(flows=["image->last", "keep-only:question->last"], mode="keep-only")
    assert [str(f) for f in settings.flows] == ["keep-only:image->last", "keep-only:question->last"]
    assert "mode" not in settings.identity()  # the flows carry it
    assert [str(f) for f in settings.with_flows(settings.flows[:1]).flows] == ["keep-only:image->last"]
