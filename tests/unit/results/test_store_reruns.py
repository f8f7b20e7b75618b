"""The store under reruns: a retried error is replaced by its new result, rows of added flows extend a
computed sample, errors show only what is still failing, and a run's flow list may grow."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from vlmflow.errors import ConfigError
from vlmflow.positions.routes import Flow
from vlmflow.results.store import CommitError, RunStore
from vlmflow.results.tables import ErrorRow, FlowRow, SampleRow


def _sample(sid: str) -> SampleRow:
    return SampleRow(
        sample_id=sid, task="T", image_id="i", question="q?", answer="a", prediction="a", correct=True, kept=True,
        answer_token_id=1, answer_token="a", p_base=0.5, seq_len=9, n_image_tokens=4, group_sizes="{}",
    )


def _flows(sid: str, flow: str, layers: int = 2) -> list[FlowRow]:
    return [
        FlowRow(
            sample_id=sid, task="T", flow=Flow.parse(flow), layer=layer, layers_blocked=[layer], window=1, p_base=0.5,
            p_blocked=0.25, rel_change=-50.0, logprob_diff=-0.7, answer_changed=False, answer_token_id=1,
            blocked_token_id=1, n_source=2, n_target=1, engine="fast", kl=0.1,
        )
        for layer in range(layers)
    ]


def test_a_retried_sample_replaces_its_error_and_a_failed_retry_its_reason(tmp_path: Path):
    store = RunStore.open(tmp_path / "run", {"x": 1}, fsync=False)
    store.commit({"errors": [ErrorRow(sample_id="s1", stage="image", reason="missing")]})
    store.commit({"errors": [ErrorRow(sample_id="s2", stage="image", reason="missing")]})
    assert store.done_sample_ids() == store.error_sample_ids() == {"s1", "s2"}
    # s1: the image is there now; s2: still missing, with a new reason.
    store.commit({"samples": [_sample("s1")], "flows": _flows("s1", "image->last")})
    store.commit({"errors": [ErrorRow(sample_id="s2", stage="image", reason="still missing")]})
    errors = store.read("errors")
    assert errors[["sample_id", "reason"]].values.tolist() == [["s2", "still missing"]]
    assert store.error_sample_ids() == {"s2"} and store.done_sample_ids() == {"s1", "s2"}
    # A computed sample is computed once.
    with pytest.raises(CommitError, match=r"\['s1'\] already committed"):
        store.commit({"samples": [_sample("s1")]})
    with pytest.raises(CommitError, match=r"\['s1'\] already committed"):
        store.commit({"errors": [ErrorRow(sample_id="s1", stage="image", reason="again")]})
    store.finalize({})
    reread = RunStore.load(tmp_path / "run")
    assert reread.read("errors")["sample_id"].tolist() == ["s2"]  # the consolidated file too


def test_rows_of_added_flows_extend_a_computed_sample_and_resolve_its_flow_errors(tmp_path: Path):
    store = RunStore.open(tmp_path / "run", {"x": 1}, fsync=False)
    failed = ErrorRow(sample_id="s1", stage="groups", reason="no true option", flow="true_option->last")
    store.commit({"samples": [_sample("s1")], "flows": _flows("s1", "image->last"), "errors": [failed]})
    assert store.flow_keys() == {"s1": {"image->last"}} and store.flow_errors() == {"s1": {"true_option->last"}}
    assert store.read("errors")["flow"].tolist() == ["true_option->last"]
    assert store.done_sample_ids() == {"s1"} and not store.error_sample_ids()  # a flow error is not the sample's
    # An added flow: rows without a samples row, for a computed sample.
    store.commit({"flows": _flows("s1", "question->last")})
    # The retried flow now computes: its error is resolved.
    store.commit({"flows": _flows("s1", "true_option->last")})
    assert store.flow_keys() == {"s1": {"image->last", "question->last", "true_option->last"}}
    assert store.read("errors").empty and not store.flow_errors()
    with pytest.raises(CommitError, match=r"key \{'sample_id': 's1', 'flow': 'image->last', 'layer': 0\} is already committed"):
        store.commit({"flows": _flows("s1", "image->last")})
    with pytest.raises(CommitError, match=r"\['s9'\] have rows but no 'samples' or 'errors' row"):
        store.commit({"flows": _flows("s9", "image->last")})
    # A route no sample of a task can resolve is recorded once, under the task.
    route = ErrorRow(sample_id="task:T", stage="route", reason="no true option", flow="true_option->last")
    store.commit({"errors": [route]})
    assert store.read("errors")["sample_id"].tolist() == ["task:T"] and "task:T" not in store.done_sample_ids()


def test_a_growing_key_of_the_identity_is_not_compared_and_grows_in_spec_json(tmp_path: Path):
    run = tmp_path / "run"
    grows = [("settings", "flows")]
    spec = {"model": "m", "settings": {"flows": ["a->b"], "window": 3}}
    RunStore.open(run, spec, fsync=False, growing=grows)
    RunStore.open(run, {"model": "m", "settings": {"flows": ["c->d", "a->b"], "window": 3}}, fsync=False, growing=grows)
    assert json.loads((run / "spec.json").read_text())["settings"]["flows"] == ["a->b", "c->d"]
    store = RunStore.open(run, spec, fsync=False, growing=grows)  # fewer flows: nothing lost
    assert store.spec["settings"]["flows"] == ["a->b", "c->d"]
    with pytest.raises(ConfigError, match="settings.window: stored 3, now 5"):
        RunStore.open(run, {"model": "m", "settings": {"flows": ["a->b"], "window": 5}}, growing=grows)
    with pytest.raises(ConfigError, match="settings.flows"):  # without the declaration, flows are compared
        RunStore.open(run, {"model": "m", "settings": {"flows": ["e->f"], "window": 3}})


def test_an_empty_run_writes_the_experiments_tables(tmp_path: Path):
    store = RunStore.open(tmp_path / "run", {"x": 1}, fsync=False)
    store.finalize({}, tables=("flows",))
    assert sorted(p.name for p in (tmp_path / "run").glob("*.parquet")) == ["errors.parquet", "flows.parquet", "samples.parquet"]
    assert RunStore.load(tmp_path / "run").read("flows").empty
