"""The result tables, declared once in vlmflow.results.tables: schemas derived from the row classes
equal those of runs already on disk, rows are checked strictly and fast, every table is known in a
fresh process without its experiment, and a finalized run whose parts/ was deleted reads whole."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from vlmflow.errors import ConfigError
from vlmflow.positions.groups import Flow, Group
from vlmflow.results import schema
from vlmflow.results.schema import ORIGINAL, Int32, RowError, TableSpec, column, column_doc
from vlmflow.results.store import PARTS_DIR, RunStore
from vlmflow.results.tables import (
    TABLES,
    AttentionRow,
    ControlRow,
    ErrorRow,
    FlowRow,
    LensRow,
    SampleRow,
    build_table,
    flows_of,
    table_spec,
    tables_markdown,
)

#: A run written before the tables were declared statically (see tests/fixtures/saved-runs/README.md).
V1_RUN = Path(__file__).parents[2] / "fixtures" / "saved-runs" / "v1"
ROOT = Path(__file__).parents[3]


IMAGE_LAST = Flow(Group.IMAGE, Group.LAST)


def _flow_row(sample_id: str = "q1", flow: Flow = IMAGE_LAST, layer: int = 0, **changes) -> FlowRow:
    values = dict(
        sample_id=sample_id, task="ChooseAttr", flow=flow, layer=layer, layers_blocked=[layer], window=1,
        p_base=0.5, p_blocked=0.25, rel_change=-50.0, logprob_diff=-math.log(2), answer_changed=False,
        answer_token_id=7, blocked_token_id=7, n_source=16, n_target=1, engine="fast", kl=0.125,
    )
    return FlowRow(**{**values, **changes})


def _sample_row(sample_id: str = "q1", kept: bool = True) -> SampleRow:
    return SampleRow(
        sample_id=sample_id, task="ChooseAttr", image_id="img", question="Is it red?", answer="red", prediction="red",
        correct=kept, kept=kept, answer_token_id=7, answer_token="▁red", p_base=0.5, seq_len=40, n_image_tokens=16,
        group_sizes=json.dumps({"image": 16}),
    )


# --- the declarations are the contract of the files on disk ------------------------------------------


@pytest.mark.parametrize("name", list(TABLES))
def test_derived_schema_keeps_every_column_of_files_written_before(name: str):
    """Columns are only ever added (each with the value older rows read back with), never changed."""
    on_disk = pq.read_schema(V1_RUN / f"{name}.parquet")
    spec = TABLES[name]
    derived = spec.schema
    for field in on_disk:
        assert field.type == derived.field(field.name).type, field.name
    assert not any(f.nullable for f in on_disk) and not any(f.nullable for f in derived)
    added = [c.name for c in spec.columns if c.added is not ORIGINAL]
    assert sorted(set(derived.names) - set(on_disk.names)) == sorted(added)


def test_the_columns_added_since_and_what_older_rows_read_back_with():
    added = {name: {c.name: c.added for c in spec.columns if c.added is not ORIGINAL} for name, spec in TABLES.items()}
    assert added["errors"] == {"flow": ""}
    flows = added["flows"]
    assert {k: v for k, v in flows.items() if k != "kl"} == {"metric": "first-token", "window_style": "centred", "n_answer_tokens": 1}
    assert math.isnan(flows["kl"]) and added["controls"].keys() == flows.keys()
    assert not any(added[name] for name in ("samples", "lens", "lens_top", "attention"))


def test_every_table_is_declared_with_a_key_and_documented_columns():
    assert list(TABLES) == ["samples", "errors", "flows", "controls", "lens", "lens_top", "attention"]
    assert {name for name, spec in TABLES.items() if spec.core} == {"samples", "errors"}
    for spec in TABLES.values():
        assert spec.key[0] == "sample_id" and set(spec.key) <= set(spec.schema.names)
        assert all(column_doc(f).endswith(".") for f in spec.schema), spec.name


def test_control_rows_are_flow_rows_plus_the_draw():
    assert issubclass(ControlRow, FlowRow)
    assert TABLES["controls"].schema.names == [*TABLES["flows"].schema.names, "draw"]
    row = ControlRow.of(_flow_row(layer=3), draw=2)
    assert row.draw == 2 and all(getattr(row, f.name) == getattr(_flow_row(layer=3), f.name) for f in fields(FlowRow))


def test_a_row_class_is_declared_with_int_widths_and_docs():
    @dataclass(frozen=True, kw_only=True)
    class Plain:
        sample_id: str = column("Sample.")
        count: int = column("Plain int: which width?")

    with pytest.raises(ConfigError, match=r"Plain.count: annotate integers as Int32 or Int64"):
        TableSpec("plain", Plain, ("sample_id",))

    @dataclass(frozen=True, kw_only=True)
    class Undocumented:
        sample_id: str = column("Sample.")
        count: Int32 = 0

    with pytest.raises(ConfigError, match=r"Undocumented.count: declare it with column"):
        TableSpec("undocumented", Undocumented, ("sample_id",))
    with pytest.raises(ConfigError, match="key columns \\['nope'\\] are not in its schema"):
        TableSpec("errors2", ErrorRow, ("sample_id", "nope"))


def test_docs_results_md_is_generated_from_the_declarations():
    text = (ROOT / "docs" / "results.md").read_text(encoding="utf-8")
    assert text == tables_markdown(), (
        "docs/results.md is out of date; regenerate it with: python -c \"from vlmflow.results.tables import "
        "tables_markdown; open('docs/results.md', 'w').write(tables_markdown())\""
    )
    for spec in TABLES.values():
        for f in spec.schema:
            assert f"| `{f.name}` |" in text


# --- rows are checked strictly, on the fast path -----------------------------------------------------


@pytest.mark.parametrize("table, row, message", [
    ("flows", _flow_row(layer=True), "column 'layer' (int32): expected an integer, got bool"),
    ("flows", _flow_row(layer=2**31), "column 'layer' (int32): 2147483648 does not fit int32"),
    ("flows", _flow_row(p_base="0.5"), "column 'p_base' (double): expected a number, got str"),
    ("flows", _flow_row(flow="image->last"), "column 'flow': expected a Flow, got str"),
    ("flows", _flow_row(layers_blocked=[1, 2.0]), "column 'layers_blocked' (list<item: int32>): item 1: expected an integer, got float"),
    ("flows", _flow_row(layers_blocked="12"), "column 'layers_blocked' (list<item: int32>): expected a list, got str"),
    ("flows", _flow_row(engine=None), "column 'engine' (string): is None (columns are not nullable)"),
    ("flows", ControlRow.of(_flow_row(), draw=0), "expected a FlowRow, got ControlRow"),
    ("samples", _flow_row(), "expected a SampleRow, got FlowRow"),
], ids=["bool-for-int", "int-range", "str-for-float", "str-for-flow", "list-item", "str-for-list", "none", "subclass", "class"])
def test_a_row_that_does_not_fit_is_refused_naming_table_row_and_column(table, row, message):
    good = _sample_row("q0") if table == "samples" else _flow_row("q0")
    with pytest.raises(RowError) as info:
        build_table(table, [good, row])
    assert str(info.value) == f"table {table!r}, row 1 (sample_id 'q1'): {message}"


def test_missing_and_unknown_columns_cannot_be_built():
    with pytest.raises(TypeError, match="reason"):
        ErrorRow(sample_id="q1", stage="image")  # type: ignore[call-arg]
    with pytest.raises(TypeError, match="colour"):
        ErrorRow(sample_id="q1", stage="image", reason="", colour="red")  # type: ignore[call-arg]


def test_valid_rows_take_the_fast_path_and_keep_their_values(monkeypatch: pytest.MonkeyPatch):
    def per_value(*args):
        raise AssertionError("valid rows must not be checked value by value")

    monkeypatch.setattr(schema, "_type_problem", per_value)
    rows = [_flow_row(layer=i % 32, layers_blocked=np.arange(3, dtype=np.int64), p_blocked=np.float32(0.25), n_source=np.int32(4))
            for i in range(2000)]
    table = build_table("flows", rows)
    assert table.num_rows == 2000 and table.schema.equals(TABLES["flows"].schema)
    assert table.slice(0, 1).to_pylist()[0]["flow"] == "image->last"
    attention = build_table("attention", [AttentionRow(
        sample_id="q1", task="", layer=0, target="last", source="image", mass=0.5, mass_per_head=[0.25, 0.75],
        n_target=1, n_source=16,
    )])
    assert attention.column("mass_per_head").to_pylist() == [[0.25, 0.75]]


def test_flows_of_parses_each_distinct_value_once(monkeypatch: pytest.MonkeyPatch):
    seen = []
    parse = Flow.parse.__func__

    monkeypatch.setattr(Flow, "parse", classmethod(lambda cls, text: seen.append(text) or parse(cls, text)))
    column_values = ["image->last", "related->question"] * 50
    assert flows_of(column_values) == {"image->last": Flow(Group.IMAGE, Group.LAST), "related->question": Flow(Group.RELATED, Group.QUESTION)}
    assert seen == ["image->last", "related->question"]
    with pytest.raises(ConfigError, match="unknown position group 'picture'"):
        flows_of(["picture->last"])


def test_unknown_table_names_the_tables():
    with pytest.raises(ConfigError, match="unknown result table 'lense'; tables: samples, errors, flows, controls, lens"):
        table_spec("lense")


# --- the store knows every table, also without parts/ ------------------------------------------------


def test_a_run_written_before_reads_every_table_and_resumes(tmp_path: Path):
    run = tmp_path / "run"
    shutil.copytree(V1_RUN, run)
    store = RunStore.load(run)
    assert not (run / PARTS_DIR).exists()
    assert store.tables() == sorted(TABLES)
    assert store.read("controls")["draw"].tolist() == [0, 0, 1, 1]
    flows = store.read("flows")
    assert set(flows["metric"]) == {"first-token"} and set(flows["window_style"]) == {"centred"}
    assert flows["kl"].isna().all() and set(flows["n_answer_tokens"]) == {1}
    assert set(store.read("errors")["flow"]) == {""} and list(store.read("errors")["sample_id"]) == ["s3"]
    assert store.read("lens")["token"].iloc[0] == "▁red"
    assert store.done_sample_ids() == {"s1", "s2", "s3"}

    resumed = RunStore.open(run, json.loads((run / "spec.json").read_text()), fsync=False)
    flow = Flow(Group.RELATED, Group.QUESTION)
    resumed.commit({"samples": [_sample_row("s4")], "flows": [_flow_row("s4", flow, 0), _flow_row("s4", flow, 1)]})
    resumed.finalize({"samples": 3})
    flows = RunStore.load(run).read("flows")
    assert len(flows) == 6 and set(flows.loc[flows["sample_id"] == "s4", "flow"]) == {"related->question"}
    assert pq.read_schema(run / "flows.parquet").remove_metadata().equals(TABLES["flows"].schema.remove_metadata())


def test_consolidated_tables_are_listed_and_read_after_parts_are_deleted(tmp_path: Path):
    store = RunStore.open(tmp_path / "run", {"experiment": "lens"}, fsync=False)
    lens = [
        LensRow(sample_id="q1", task="", readout="raw", group="last", position=9, layer=j, form="answer", final_norm=False,
                word="red", token_id=7, token="▁red", prob=0.1 * j, log_prob=math.log(0.1 * j + 1e-9), rank=3 - j)
        for j in range(3)
    ]
    store.commit({"samples": [_sample_row("q1")], "lens": lens})
    store.commit({"errors": [ErrorRow(sample_id="q2", stage="image", reason="missing")]})
    store.finalize()
    before = {name: store.read(name) for name in store.tables()}
    shutil.rmtree(tmp_path / "run" / PARTS_DIR)
    after = RunStore.load(tmp_path / "run")
    assert after.tables() == sorted(before) == ["errors", "lens", "samples"]
    for name, frame in before.items():
        assert after.read(name).equals(frame), name


def test_a_fresh_process_reads_every_table_without_importing_an_experiment(tmp_path: Path):
    # The API imports the (torch-free) settings declarations, never an experiment's code.
    code = (
        "import sys, json, vlmflow\n"
        f"run = vlmflow.load_run({str(V1_RUN)!r})\n"
        "sizes = {name: len(run.table(name)) for name in run.tables}\n"
        "sizes.update(lens=len(run.lens), lens_top=len(run.lens_top), controls=len(run.controls), attention=len(run.attention))\n"
        "print(json.dumps(sizes))\n"
        "declarations = {'vlmflow.experiments', 'vlmflow.experiments.settings', 'vlmflow.experiments.windows'}\n"
        "print(sorted(m for m in sys.modules if (m.startswith('vlmflow.experiments') and m not in declarations) or m in ('torch', 'transformers')))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.splitlines()
    expected = {name: RunStore.load(V1_RUN).read_arrow(name).num_rows for name in TABLES}
    assert json.loads(out[0]) == expected and all(expected.values())
    assert out[1] == "[]"
