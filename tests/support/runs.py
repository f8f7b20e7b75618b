"""Hand-made run directories (typed rows committed with a RunStore, no model): a flows run and a lens run
over a named data file, for tests of figures and of the command line around them."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from vlmflow.positions.groups import PAPER_FLOWS
from vlmflow.results.store import RunStore
from vlmflow.results.tables import FlowRow, LensRow, LensTopRow, SampleRow

QUESTION = ("▁Is", "▁the", "▁square", "▁red", "▁or", "▁blue", "?")


def _spec(experiment: str, data: str) -> dict:
    return {
        "experiment": experiment,
        "model": {"name": "models/tiny-llava"},
        "data": {"data": data, "sha256": f"sha-of-{data}"},
        "settings": {"flows": [str(f) for f in PAPER_FLOWS]} if experiment == "flows" else {},
    }


def _sample(sample_id: str) -> SampleRow:
    return SampleRow(
        sample_id=sample_id, task="ChooseAttr", image_id="img", question="Is the square red or blue?", answer="red",
        prediction="Red", correct=True, kept=True, answer_token_id=7, answer_token="▁Red", p_base=0.5, seq_len=30,
        n_image_tokens=16, group_sizes=json.dumps({"image": 16, "question": len(QUESTION)}),
    )  # fmt: skip


def write_flows_run(path: Path, *, data: str, n_samples: int = 3, n_layers: int = 6) -> Path:
    """A finished flows run over ``data``: the paper's six flows, three of them flat at 0."""
    store = RunStore.open(path, _spec("flows", data), fsync=False)
    for s in range(n_samples):
        sid = f"s{s}"
        rows = []
        for i, flow in enumerate(PAPER_FLOWS):
            for layer in range(n_layers):
                change = -10.0 * (i + 1) * (layer == i % n_layers) if i < 3 else 0.0
                rows.append(FlowRow(
                    sample_id=sid, task="ChooseAttr", flow=flow, layer=layer, layers_blocked=[layer], window=1,
                    p_base=0.5, p_blocked=0.5 * (1 + change / 100), rel_change=change, logprob_diff=0.0,
                    answer_changed=False, answer_token_id=7, blocked_token_id=7, n_source=3, n_target=1, engine="fast",
                ))  # fmt: skip
        store.commit({"samples": [_sample(sid)], "flows": rows})
    store.finalize({})
    return path


def write_lens_run(path: Path, *, data: str, n_samples: int = 3, n_layers: int = 6, groups: Sequence[str] = ()) -> Path:
    """A finished lens run over ``data``: the answer rises with depth; ``groups`` are read at every position."""
    store = RunStore.open(path, _spec("lens", data), fsync=False)
    forms = {"answer": "red", "answer_capitalized": "Red", "false_option": "blue", "false_option_capitalized": "Blue"}
    for s in range(n_samples):
        sid = f"s{s}"
        places = [("last", 29, "▁:")] + [(g, 10 + k, token) for g in groups for k, token in enumerate(QUESTION)]
        lens, top = [], []
        for readout in ("raw", "normed"):
            for group, position, token in places:
                for layer in range(n_layers + 1):
                    for form, word in forms.items():
                        prob = layer / n_layers if form == "answer_capitalized" else 0.0
                        lens.append(LensRow(
                            sample_id=sid, task="ChooseAttr", readout=readout, group=group, position=position, layer=layer,
                            form=form, final_norm=readout == "normed", word=word, token_id=7, token=f"▁{word}",
                            prob=prob, log_prob=-1.0, rank=1,
                        ))  # fmt: skip
                    top.append(LensTopRow(
                        sample_id=sid, task="ChooseAttr", readout=readout, group=group, position=position, layer=layer,
                        final_norm=readout == "normed", input_token=token, top_token_ids=[7], top_tokens=["▁Red"],
                        top_probs=[0.5], entropy=1.0,
                    ))  # fmt: skip
        store.commit({"samples": [_sample(sid)], "lens": lens, "lens_top": top})
    store.finalize({})
    return path
