"""The lens on the shipped trained organism (a small LLaVA trained on shape scenes).

Same checks as on the random tiny models, on a model whose answer really emerges: the normed readout
at the last layer is the model's own distribution, the raw readout is the direct computation from
its hidden states, the final-layer probability is the flows' baseline, and ``vlmflow lens`` writes
the figure. Skipped (with the reason) only when the organism is not in the package.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import pandas as pd
import pytest
import torch

from vlmflow.data.sample import TaskType
from vlmflow.experiments.flows import FlowSettings
from vlmflow.experiments.lens import LensSettings, Readout, lens_states, readout_logits
from vlmflow.knockout.fast import clean_run
from vlmflow.knockout.reference import clean_logits
from vlmflow.positions.groups import Flow, Group


def _organism_dir() -> Path | None:
    path = Path(str(resources.files("vlmflow").joinpath("resources", "organism")))
    return path if (path / "config.json").is_file() else None


ORGANISM = _organism_dir()
pytestmark = pytest.mark.skipif(
    ORGANISM is None, reason="the trained organism is not in the package (vlmflow/resources/organism has no config.json)"
)

def _scene(index: int):
    """A held-out colour-or-size choice question from the organism's own scene generator."""
    from vlmflow.data.scene_sets import task_questions

    (question,) = task_questions(TaskType.CHOOSE_ATTR, 1, seed=4321, start=index)
    return question.sample, question.scene.render()


@pytest.fixture(scope="module")
def organism():
    from vlmflow.experiments.prepare import prepare_sample
    from vlmflow.loading import load_model

    loaded = {impl: load_model(ORGANISM, device="cpu", dtype="float32", attn_implementation=impl) for impl in ("sdpa", "eager")}
    sample, image = _scene(0)
    return {impl: (m, prepare_sample(m, sample, image)) for impl, m in loaded.items()}


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_normed_last_layer_is_the_organisms_own_distribution(organism, impl):
    loaded, prepared = organism[impl]
    n = prepared.encoded.seq_len
    clean = clean_run(loaded.decoder, prepared.encoded, capture_from=n - 1)
    normed = readout_logits(loaded.decoder, lens_states(clean, [n - 1]), Readout.NORMED)[0]
    own = clean_logits(loaded.decoder, prepared.encoded)
    torch.testing.assert_close(torch.log_softmax(normed[-1], -1), torch.log_softmax(own, -1), atol=1e-5, rtol=0)


def test_raw_readout_matches_a_direct_computation_on_the_organism(organism):
    loaded, prepared = organism["sdpa"]
    with torch.no_grad():
        hidden = loaded.model(**prepared.encoded.inputs, output_hidden_states=True).hidden_states
    direct = torch.stack([h[0, -1] for h in hidden]).float() @ loaded.model.get_output_embeddings().weight.float().T
    n = prepared.encoded.seq_len
    clean = clean_run(loaded.decoder, prepared.encoded, capture_from=n - 1)
    raw = readout_logits(loaded.decoder, lens_states(clean, [n - 1]), Readout.RAW)[0]
    torch.testing.assert_close(raw, direct, atol=1e-4, rtol=1e-5)


def test_final_layer_answer_probability_is_the_flows_baseline_on_the_organism(organism):
    loaded, prepared = organism["sdpa"]
    lens = pd.DataFrame(LensSettings(keep_all=True).analyse(loaded, prepared)["lens"])
    flows = FlowSettings(keep_all=True, flows=(Flow(Group.IMAGE, Group.LAST),)).analyse(loaded, prepared)
    p_base = flows["flows"][0].p_base
    final = lens[(lens["layer"] == loaded.n_layers) & (lens["form"] == "generated")]
    assert final["prob"].tolist() == pytest.approx([p_base, p_base], rel=1e-5)
    assert final["rank"].tolist() == [1, 1]


def test_vlmflow_lens_on_the_organism_writes_the_figure(tmp_path: Path):
    from vlmflow.cli.main import main
    from vlmflow.data.csvio import write_task_csv
    from vlmflow.experiments.lens import summarise_lens
    from vlmflow.results.store import RunStore

    samples = []
    for i in range(8):
        sample, image = _scene(i)
        image.save(tmp_path / f"{sample.image_id}.png")
        samples.append(sample)
    write_task_csv(samples, tmp_path / "ChooseAttr.csv")
    rc = main(["lens", "--model", str(ORGANISM), "--data", str(tmp_path / "ChooseAttr.csv"), "--out", str(tmp_path / "runs"),
               "--name", "lens", "--device", "cpu", "--keep-all"])
    assert rc == 0
    run = tmp_path / "runs" / "lens"
    assert (run / "figures" / "lens_raw.pdf").is_file()
    summary = summarise_lens(RunStore.load(run).read("lens"))
    # The greedy token is the top-1 of the last layer in both readouts, for every sample.
    for readout in ("raw", "normed"):
        assert summary[readout]["generated"]["reach_top1"] == len(samples)
