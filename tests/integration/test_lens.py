"""The logit lens on tiny LLaVA models: layer indexing, the two readouts, and the link to the flows.

The readouts are checked against independent computations from the model's own
``output_hidden_states`` (Hugging Face's last hidden state is the normed one, which is what the
paper reads at ``j = L``) and against the model's own output distribution.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
import torch

from vlmflow.experiments.flows import FlowSettings
from vlmflow.experiments.lens import LensSettings, Readout, lens_states, readout_logits
from vlmflow.knockout.fast import clean_run
from vlmflow.knockout.reference import clean_logits
from vlmflow.positions.groups import Flow, Group
from vlmflow.results.tables import build_table

SHAPES = ["sp-gqa", "bpe-mha", "word-mqa"]


def _hf_hidden_states(loaded, prepared) -> tuple[torch.Tensor, ...]:
    with torch.no_grad():
        out = loaded.model(**prepared.encoded.inputs, output_hidden_states=True)
    return tuple(h[0] for h in out.hidden_states)  # L + 1 of [seq, d_model]; the last one is normed


def _last_logits(loaded, prepared, readout):
    n = prepared.encoded.seq_len
    clean = clean_run(loaded.decoder, prepared.encoded, capture_from=n - 1)
    return readout_logits(loaded.decoder, lens_states(clean, [n - 1]), readout)[0]  # [L+1, vocab]


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
@pytest.mark.parametrize("shape", SHAPES)
def test_normed_readout_at_the_last_layer_is_the_models_own_distribution(tiny_prepared, shape, impl):
    loaded, prepared = tiny_prepared(shape, impl)
    normed = _last_logits(loaded, prepared, Readout.NORMED)
    assert normed.shape[0] == loaded.n_layers + 1
    own = clean_logits(loaded.decoder, prepared.encoded)
    torch.testing.assert_close(torch.log_softmax(normed[-1], -1), torch.log_softmax(own, -1), atol=1e-5, rtol=0)
    raw = _last_logits(loaded, prepared, Readout.RAW)
    # The paper's raw readout is normed at j = L too; below it the final norm makes a difference.
    torch.testing.assert_close(raw[-1], normed[-1], atol=0, rtol=0)
    assert (raw[:-1] - normed[:-1]).abs().amax(-1).min() > 1e-3


@pytest.mark.parametrize("shape", SHAPES)
def test_raw_readout_matches_a_direct_computation(tiny_prepared, shape):
    loaded, prepared = tiny_prepared(shape)
    hidden = _hf_hidden_states(loaded, prepared)
    unembed = loaded.model.get_output_embeddings().weight.float()  # [vocab, d_model]
    # The paper: logits_j = hidden_states[j][:, -1, :] @ W_U^T, softmax over the full vocabulary.
    direct = torch.stack([h[-1] for h in hidden]).float() @ unembed.T  # [L+1, vocab]
    ours = _last_logits(loaded, prepared, Readout.RAW)
    torch.testing.assert_close(ours, direct, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("shape", SHAPES)
def test_lens_rows_match_direct_probabilities_and_ranks(tiny_prepared, shape):
    loaded, prepared = tiny_prepared(shape)
    tables = LensSettings(keep_all=True, top_k=3).analyse(loaded, prepared)
    lens = pd.DataFrame(tables["lens"])
    hidden = _hf_hidden_states(loaded, prepared)
    norm = loaded.decoder.final_norm
    head = loaded.model.get_output_embeddings()
    n_layers = loaded.n_layers
    with torch.no_grad():
        last = torch.stack([h[-1] for h in hidden])  # [L+1, d_model]
        normed_states = torch.cat([norm(last[:-1]), last[-1:]])  # hidden[L] is already normed
        direct = {
            "raw": torch.log_softmax(head(last).float(), -1),
            "normed": torch.log_softmax(head(normed_states).float(), -1),
        }
    assert set(lens["form"]) >= {"answer", "answer_capitalized", "false_option", "false_option_capitalized", "generated"}
    assert len(lens) == 2 * (n_layers + 1) * lens["form"].nunique()
    for row in lens.itertuples():
        logp = direct[row.readout][row.layer]
        assert row.log_prob == pytest.approx(float(logp[row.token_id]), abs=1e-4)
        assert row.rank == int((logp > logp[row.token_id]).sum()) + 1
        assert row.final_norm == (row.readout == "normed" or row.layer == n_layers)
    top = pd.DataFrame(tables["lens_top"])
    for row in top.itertuples():
        expected = direct[row.readout][row.layer].topk(3).indices.tolist()
        assert list(row.top_token_ids) == expected
    for name, rows in tables.items():
        build_table(name, rows)  # every row fits its table


@pytest.mark.parametrize("shape", SHAPES)
def test_final_layer_probability_is_the_flows_baseline(tiny_prepared, shape):
    loaded, prepared = tiny_prepared(shape)
    lens_tables = LensSettings(keep_all=True).analyse(loaded, prepared)
    flow_tables = FlowSettings(keep_all=True, flows=(Flow(Group.IMAGE, Group.LAST),)).analyse(loaded, prepared)
    p_base = flow_tables["flows"][0].p_base
    assert lens_tables["samples"][0].p_base == flow_tables["samples"][0].p_base == p_base
    lens = pd.DataFrame(lens_tables["lens"])
    final = lens[(lens["layer"] == loaded.n_layers) & (lens["form"] == "generated")]
    assert len(final) == 2
    assert final["token_id"].tolist() == [flow_tables["samples"][0].answer_token_id] * 2
    for prob in final["prob"]:
        assert prob == pytest.approx(p_base, rel=1e-5)
    assert final["rank"].tolist() == [1, 1]  # the greedy token is top-1 of the model's own distribution


def test_lens_costs_one_forward(tiny_prepared):
    loaded, prepared = tiny_prepared("sp-gqa")
    n = prepared.encoded.seq_len
    calls = {"prefill": 0, "vision": 0}
    layer0 = loaded.decoder.layers[0]

    def count_layer(module, args, kwargs, output):  # a layer-0 call over the whole prompt that ran to its end
        hidden = args[0] if args else kwargs["hidden_states"]
        if hidden.shape[-2] == n:
            calls["prefill"] += 1

    def count_vision(module, args, kwargs):
        calls["vision"] += 1

    handles = [
        layer0.register_forward_hook(count_layer, with_kwargs=True),
        loaded.model.model.vision_tower.register_forward_pre_hook(count_vision, with_kwargs=True),
    ]
    try:
        tables = LensSettings(keep_all=True, groups=(Group.QUESTION,)).analyse(loaded, prepared)
    finally:
        for h in handles:
            h.remove()
    assert tables["lens"]
    assert calls == {"prefill": 1, "vision": 1}


@pytest.mark.parametrize("shape", ["sp-gqa", "word-mqa"])
def test_group_positions_are_read_like_the_last_one(tiny_prepared, shape):
    loaded, prepared = tiny_prepared(shape)
    tables = LensSettings(keep_all=True, groups=(Group.QUESTION,), readouts=(Readout.NORMED,)).analyse(loaded, prepared)
    lens = pd.DataFrame(tables["lens"])
    question = prepared.groups[Group.QUESTION]
    assert sorted(set(lens.loc[lens["group"] == "question", "position"])) == list(question)
    hidden = _hf_hidden_states(loaded, prepared)
    norm = loaded.decoder.final_norm
    head = loaded.model.get_output_embeddings()
    with torch.no_grad():
        for row in lens[lens["group"] == "question"].itertuples():
            state = hidden[row.layer][row.position]
            if row.layer < loaded.n_layers:
                state = norm(state)
            logp = torch.log_softmax(head(state).float(), -1)
            assert row.log_prob == pytest.approx(float(logp[row.token_id]), abs=1e-4)
    top = pd.DataFrame(tables["lens_top"])
    tokens = loaded.tokenizer.convert_ids_to_tokens(prepared.encoded.input_ids.tolist())
    for row in top.itertuples():
        assert row.input_token == tokens[row.position]


def test_wrong_answers_are_dropped_unless_keep_all(tiny_prepared):
    loaded, prepared = tiny_prepared("sp-gqa")
    tables = LensSettings().analyse(loaded, prepared)
    if tables["samples"][0].correct:
        pytest.skip("the random tiny model happens to answer correctly")
    assert set(tables) == {"samples"}


def test_cli_writes_the_lens_figures_and_the_combined_figure(tiny_checkpoint, tmp_path: Path):
    from dataclasses import replace

    from conftest import make_scene_sample
    from vlmflow.cli.main import main
    from vlmflow.data.csvio import write_task_csv
    from vlmflow.results.store import RunStore

    sample, image = make_scene_sample()
    image.save(tmp_path / "img1.png")
    write_task_csv([replace(sample, sample_id=f"q{i}") for i in range(2)], tmp_path / "ChooseAttr.csv")
    common = ["--model", str(tiny_checkpoint("word-mqa")), "--data", str(tmp_path / "ChooseAttr.csv"),
              "--out", str(tmp_path / "runs"), "--keep-all", "--device", "cpu"]
    assert main(["flows", *common, "--name", "flows", "--no-plot"]) == 0
    assert main(["lens", *common, "--name", "lens", "--group", "question", "--attention",
                 "--flows-run", str(tmp_path / "runs" / "flows")]) == 0
    run = tmp_path / "runs" / "lens"
    figures = {p.name for p in (run / "figures").iterdir()}
    assert {"lens_raw.png", "lens_raw.pdf", "lens_normed.png", "flows_over_lens.png",
            "lens_question_positions.png", "attention_last.png"} <= figures
    store = RunStore.load(run)
    assert {"lens", "lens_top", "attention", "samples"} <= set(store.tables())
    assert store.read("lens")["sample_id"].nunique() == 2
    # Rerunning the same spec resumes: nothing is recomputed, the tables are unchanged.
    before = len(store.read("lens"))
    assert main(["lens", *common, "--name", "lens", "--group", "question", "--attention", "--no-plot"]) == 0
    assert len(RunStore.load(run).read("lens")) == before


def test_cli_refuses_an_unknown_readout(tiny_checkpoint, tmp_path: Path, capsys):
    from vlmflow.cli.main import main

    rc = main(["lens", "--model", str(tiny_checkpoint("word-mqa")), "--data", "gqa:ChooseAttr",
               "--readout", "tuned", "--out", str(tmp_path)])
    assert rc == 2


def test_lens_reuses_the_flow_experiments_clean_run(tiny_prepared):
    from vlmflow.experiments.flows import analyse_sample
    from vlmflow.experiments.lens import lens_tables

    loaded, prepared = tiny_prepared("bpe-mha")
    settings = LensSettings(keep_all=True)
    result = analyse_sample(loaded, prepared, FlowSettings(keep_all=True))
    shared = lens_tables(loaded, prepared, result.clean, result.sample, settings)
    alone = settings.analyse(loaded, prepared)
    for name in ("lens", "lens_top"):
        a, b = pd.DataFrame(shared[name]), pd.DataFrame(alone[name])
        pd.testing.assert_frame_equal(a, b, check_exact=False, atol=1e-6, rtol=0)
