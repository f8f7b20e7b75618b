"""The bad-input catalogue: every kind of bad sample becomes one error row (sample, flow, stage,
reason) naming the bad value, in the results and in the summary, and the run goes on: a problem of
the whole sample is one row for the sample, a group one flow needs is one row for that (sample,
flow) and the sample's other flows are computed. Every bad configuration stops the run before any
work, with a message naming the value and what is valid."""

from __future__ import annotations

import json
import math
import re
from contextlib import ExitStack
from dataclasses import dataclass, replace
from pathlib import Path
from unittest import mock

import pytest
import torch

import vlmflow.experiments.engines as engines_module
import vlmflow.knockout.fast as fast_module
from conftest import make_scene_sample
from vlmflow.data.csvio import write_task_csv
from vlmflow.data.sample import Box, SceneObject
from vlmflow.errors import ConfigError, SampleError, UnsupportedModelError
from vlmflow.experiments.flows import FlowSettings
from vlmflow.experiments.prepare import prepare_sample
from vlmflow.experiments.runner import DataSpec, RunSpec, run_to_store
from vlmflow.load_spec import LoadSpec
from vlmflow.positions.groups import Flow, Group
from vlmflow.results.store import RunStore

#: Both flows need groups that bad samples lack (related patches, the true option word).
FLOWS = (Flow(Group.RELATED, Group.QUESTION), Flow(Group.TRUE_OPTION, Group.LAST))


def _oom(*args, **kwargs):
    raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB (simulated)")


def _nan_logits(decoder, encoded, clean, knockouts, **kwargs):
    out = torch.zeros(len(knockouts), clean.logits.shape[-1])
    out[0, 0] = math.nan
    return out


@dataclass(frozen=True)
class Sabotaged:
    """The flow experiment, with faults injected for particular sample ids (what hardware or a
    numerically unstable model would do): NaN in the clean forward, NaN under a knockout, OOM."""

    inner: FlowSettings
    name = "flows"

    @property
    def engine(self) -> str:
        return self.inner.engine

    def identity(self) -> dict:
        return self.inner.identity()

    def analyse(self, loaded, prepared):
        sample_id = prepared.sample.sample_id
        with ExitStack() as stack:
            if sample_id == "nan-clean":
                norm = loaded.decoder.final_norm
                handle = norm.register_forward_hook(lambda module, args, out: torch.full_like(out, math.nan))
                stack.callback(handle.remove)
            elif sample_id == "nan-knockout":
                stack.enter_context(mock.patch.object(engines_module, "fast_logits", _nan_logits))
            elif sample_id == "oom":
                stack.enter_context(mock.patch.object(fast_module, "run_folds", _oom))
            return self.inner.analyse(loaded, prepared)


def _object(box: Box) -> tuple[SceneObject, ...]:
    return (SceneObject("square", "1", box),)


#: sample id -> (stage, regular expression the reason must match[, the flow that failed]). The reason
#: names the bad value; without a flow the whole sample failed.
CATALOGUE = {
    "missing-image": ("image", r"image file not found for image id 'no-such-image' in .* \(tried \.jpg, \.jpeg, \.png"),
    "corrupt-image": ("image", r"cannot read image 'corrupt\.png': cannot identify image file"),
    "truncated-image": ("image", r"cannot read image 'truncated\.png': .*truncated"),
    "wrong-size-image": ("image", r"image 'img1\.png' is 40x30 but the dataset records 80x60"),
    "placeholder-question": ("prompt", r"question 'Is the <image> red or blue\?' contains the image placeholder '<image>'"),
    "box-outside": (
        "groups", r"'related' is not available for this sample: box \(x, y, w, h\) = \(50, 40, 5, 5\) lies outside the "
        r"40x30 image \(a box must overlap 0 <= x < 40, 0 <= y < 30\)", "related->question",
    ),
    "box-zero-area": (
        "groups", r"box \(x, y, w, h\) = \(6, 8, 0, 12\) has zero or negative area \(w and h must be > 0\)",
        "related->question",
    ),
    "related-empty": (
        "groups", r"position group 'related' is not available for this sample: no image patch overlaps the boxes",
        "related->question",
    ),
    "option-not-in-question": (
        "groups",
        r"position group 'true_option' is not available for this sample: true option 'green' does not occur in "
        r"the question 'Is the square red or blue\?'",
        "true_option->last",
    ),
    "answer-no-token": ("answer", r"answer 'xyzzyq' tokenises to nothing the model can produce \(ids \[.*'<unk>'"),
    "nan-clean": ("forward", r"the clean forward produced non-finite logits \(\d+ NaN and 0 infinite of \d+ values; finite"),
    "nan-knockout": (
        "knockout",
        r"a knockout forward produced non-finite logits \(first at flow related->question, layer 0: 1 NaN and 0 infinite",
    ),
    "oom": ("memory", r"out of memory even at the smallest fold size: CUDA out of memory\. Tried to allocate 20\.00 GiB"),
}


@pytest.fixture(scope="module")
def catalogue_run(tiny_loaded, tmp_path_factory):
    """One run over a good sample, one bad sample per catalogue entry and a malformed CSV row."""
    folder = tmp_path_factory.mktemp("catalogue")
    good, image = make_scene_sample("good")
    image.save(folder / "img1.png")
    (folder / "corrupt.png").write_bytes(b"this is not a png file")
    png = (folder / "img1.png").read_bytes()
    (folder / "truncated.png").write_bytes(png[: len(png) // 2])
    bad = {
        "missing-image": replace(good, image_id="no-such-image"),
        "corrupt-image": replace(good, image_id="corrupt"),
        "truncated-image": replace(good, image_id="truncated"),
        "wrong-size-image": replace(good, image_size=(80, 60)),
        "placeholder-question": replace(good, question="Is the <image> red or blue?"),
        "box-outside": replace(good, objects=_object(Box(50, 40, 5, 5))),
        "box-zero-area": replace(good, objects=_object(Box(6, 8, 0, 12))),
        # Inside the image but smaller than a pixel between two pixel centres: no patch shows it.
        "related-empty": replace(good, objects=_object(Box(10.2, 10.2, 0.3, 0.3))),
        "option-not-in-question": replace(good, true_option="green"),
        "answer-no-token": replace(good, answer="xyzzyq"),
        "nan-clean": good,
        "nan-knockout": good,
        "oom": good,
    }
    samples = [good] + [replace(sample, sample_id=sample_id) for sample_id, sample in bad.items()]
    csv = folder / "ChooseAttr.csv"
    write_task_csv(samples, csv)
    lines = csv.read_text().splitlines(keepends=True)
    malformed_line = len(lines) + 1
    csv.write_text("".join(lines) + "q-broken,img1,only three fields\n")
    loaded = tiny_loaded("sp-gqa")
    experiment = Sabotaged(FlowSettings(flows=FLOWS, keep_all=True, max_new_tokens=2))
    spec = RunSpec(LoadSpec(str(folder / "model")), DataSpec(str(csv)), experiment, name="run")
    outcome = run_to_store(spec, folder / "runs", loaded=loaded)
    return outcome, malformed_line


@pytest.mark.parametrize("sample_id", sorted(CATALOGUE))
def test_a_bad_sample_becomes_one_error_row_naming_the_value(catalogue_run, sample_id):
    outcome, _ = catalogue_run
    store = RunStore.load(outcome.path)
    errors = store.read("errors")
    stage, pattern, *failed = CATALOGUE[sample_id]
    flow = failed[0] if failed else ""
    mine = errors[errors["sample_id"] == sample_id]
    assert list(mine["flow"]) == [flow], f"{sample_id}: error rows {mine.to_dict('records')}"
    row = mine.iloc[0]
    assert row["stage"] == stage, row["reason"]
    assert re.search(pattern, row["reason"]), row["reason"]
    listed = {r["sample_id"]: r for r in outcome.summary["error_rows"]}
    assert listed[sample_id] == {"sample_id": sample_id, "flow": flow, "stage": stage, "reason": row["reason"]}
    # A failed flow leaves the sample's other flow computed; a failed sample has no rows at all.
    computed = set(store.read("flows").query("sample_id == @sample_id")["flow"])
    assert computed == ({str(f) for f in FLOWS} - {flow} if flow else set())


def test_a_malformed_csv_row_becomes_an_error_row(catalogue_run):
    outcome, line = catalogue_run
    errors = RunStore.load(outcome.path).read("errors").set_index("sample_id")
    row = errors.loc[f"line:{line}"]
    assert row["stage"] == "read"
    assert re.fullmatch(r"expected \d+ fields, found 3", row["reason"]), row["reason"]


def test_the_run_goes_on_and_the_summary_counts_every_error(catalogue_run):
    outcome, _ = catalogue_run
    store = RunStore.load(outcome.path)
    samples, flows = store.read("samples"), store.read("flows")
    per_flow = {sample_id for sample_id, entry in CATALOGUE.items() if len(entry) == 3}
    assert set(samples["sample_id"]) == {"good", *per_flow}
    assert set(flows["sample_id"]) == {"good", *per_flow} and len(flows) > 0
    assert outcome.summary["samples"] == 1 + len(per_flow)
    assert outcome.summary["errors"] == len(CATALOGUE) - len(per_flow) + 1
    assert outcome.summary["flow_errors"] == len(per_flow)
    expected = {}
    for stage, *_ in [*CATALOGUE.values(), ("read", "")]:
        expected[stage] = expected.get(stage, 0) + 1
    assert outcome.summary["errors_by_stage"] == expected
    on_disk = json.loads((outcome.path / "summary.json").read_text())
    assert on_disk["errors"] == outcome.summary["errors"]


def test_oom_shrinks_the_fold_and_gives_the_same_logits(tiny_prepared, monkeypatch):
    """An OOM with several variants per call halves the fold and retries; the results are exact."""
    loaded, prepared = tiny_prepared("sp-gqa")
    g = prepared.groups
    knockouts = [
        fast_module.Knockout.for_flows(g, [flow], [layer])
        for flow in (Flow(Group.IMAGE, Group.LAST), Flow(Group.QUESTION, Group.LAST))
        for layer in range(loaded.n_layers)
    ]
    clean = fast_module.clean_run(loaded.decoder, prepared.encoded, capture_from=g[Group.IMAGE][0])
    expected = fast_module.fast_logits(loaded.decoder, prepared.encoded, clean, knockouts)
    original = fast_module.run_folds
    sizes: list[int] = []

    def tight_memory(jobs, *args):
        sizes.extend(len(job.plan.variants) for job in jobs)
        if any(len(job.plan.variants) > 2 for job in jobs):
            raise torch.OutOfMemoryError("simulated: more than two variants do not fit")
        return original(jobs, *args)

    monkeypatch.setattr(fast_module, "run_folds", tight_memory)
    got = fast_module.fast_logits(loaded.decoder, prepared.encoded, clean, knockouts)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    assert max(sizes) > 2 and sum(s for s in sizes if s <= 2) == len(knockouts)
    monkeypatch.setattr(fast_module, "run_folds", _oom)
    with pytest.raises(torch.OutOfMemoryError):
        fast_module.fast_logits(loaded.decoder, prepared.encoded, clean, knockouts[:3])


def test_a_question_the_tokens_do_not_cover_is_a_sample_error(tiny_prepared):
    """A tokenizer that gives no character offsets leaves the question with no tokens."""
    import numpy as np

    from vlmflow.positions.build import build_position_groups

    loaded, prepared = tiny_prepared("sp-gqa")
    encoded = replace(prepared.encoded, offsets=np.zeros_like(prepared.encoded.offsets))
    start, end = encoded.question_span
    with pytest.raises(SampleError, match=rf"question text 'Is the square red or blue\?' not found in the prompt's tokens: no token's character offsets overlap characters {start}\.\.{end}") as info:
        build_position_groups(encoded, loaded.inputs.visual_blocks(encoded), prepared.sample, patch_groups=False)
    assert info.value.stage == "groups"


def test_image_token_count_mismatch_is_a_sample_error_and_stops_a_run(tiny_checkpoint, tmp_path):
    from vlmflow.loading import load_model

    loaded = load_model(tiny_checkpoint("sp-gqa"), device="cpu", dtype="float32")
    loaded.processor.num_additional_image_tokens = 2  # the processor now expands one image token more
    sample, image = make_scene_sample()
    with pytest.raises(SampleError, match="image-token count mismatch: the sequence has 17 image tokens but this image's patch layout has 16") as info:
        prepare_sample(loaded, sample, image)
    assert info.value.stage == "groups"
    image.save(tmp_path / "img1.png")
    write_task_csv([sample], tmp_path / "ChooseAttr.csv")
    spec = RunSpec(LoadSpec("x"), DataSpec(str(tmp_path / "ChooseAttr.csv")), name="run")
    # Every sample would fail the same way: the start-up self-test stops the run before any work.
    with pytest.raises(ConfigError, match="self-test: .*image-token count mismatch"):
        run_to_store(spec, tmp_path / "runs", loaded=loaded)
    assert not (tmp_path / "runs").exists()


# --- configuration problems: the run stops before any work ------------------------------------------


@pytest.fixture()
def one_sample_csv(tmp_path) -> Path:
    sample, image = make_scene_sample()
    image.save(tmp_path / "img1.png")
    write_task_csv([sample], tmp_path / "ChooseAttr.csv")
    return tmp_path / "ChooseAttr.csv"


def _cli(args, capsys) -> tuple[int, str]:
    from vlmflow.cli.main import main

    code = main(args)
    captured = capsys.readouterr()
    return code, " ".join((captured.out + captured.err).split())


def test_unknown_model_family_is_refused(tiny_checkpoint, tmp_path, one_sample_csv, capsys):
    model = tmp_path / "foo-model"
    model.mkdir()
    config = json.loads((tiny_checkpoint("sp-gqa") / "config.json").read_text())
    config["architectures"] = ["FooForConditionalGeneration"]
    (model / "config.json").write_text(json.dumps(config))
    code, text = _cli(["flows", "--model", str(model), "--data", str(one_sample_csv), "--out", str(tmp_path / "runs"), "--device", "cpu"], capsys)
    assert code == 2
    assert "no vlmflow adapter for architecture 'FooForConditionalGeneration'; supported: " in text
    assert "LlavaForConditionalGeneration" in text.split("supported: ", 1)[1]
    assert not (tmp_path / "runs").exists()
    with pytest.raises(UnsupportedModelError, match="unknown model family 'foo'; supported: .*llava"):
        from vlmflow.adapters.registry import family_named

        family_named("foo")


@pytest.mark.parametrize("impl", ["flash_attention_2", "flex_attention"])
def test_an_attention_kernel_that_ignores_masks_is_refused_at_load(tiny_checkpoint, tmp_path, one_sample_csv, capsys, impl):
    code, text = _cli(
        ["flows", "--model", str(tiny_checkpoint("sp-gqa")), "--data", str(one_sample_csv), "--out", str(tmp_path / "runs"),
         "--device", "cpu", "--attn", impl],
        capsys,
    )
    assert code == 2
    assert f"attention implementation '{impl}' cannot take a knockout mask" in text
    assert "valid: eager, sdpa" in text
    assert not (tmp_path / "runs").exists()


def test_a_model_switched_to_flash_attention_after_loading_is_refused(tiny_checkpoint, tmp_path, one_sample_csv):
    from vlmflow.loading import load_model

    loaded = load_model(tiny_checkpoint("sp-gqa"), device="cpu", dtype="float32")
    for layer in range(loaded.n_layers):
        loaded.decoder.attention(layer).config._attn_implementation = "flash_attention_2"
    spec = RunSpec(LoadSpec("x"), DataSpec(str(one_sample_csv)), name="run")
    with pytest.raises(ConfigError, match="attention implementation 'flash_attention_2' cannot take a knockout mask"):
        run_to_store(spec, tmp_path / "runs", loaded=loaded)
    assert not (tmp_path / "runs").exists()


def test_an_images_folder_without_any_of_the_images_is_refused(tiny_loaded, tmp_path, one_sample_csv):
    empty = tmp_path / "elsewhere"
    empty.mkdir()
    spec = RunSpec(LoadSpec("x"), DataSpec(str(one_sample_csv), images=str(empty)), name="run")
    with pytest.raises(ConfigError, match=r"none of the 1 samples' images is in '.*elsewhere' \(e\.g\. 'img1' with extension \.jpg"):
        run_to_store(spec, tmp_path / "runs", loaded=tiny_loaded("sp-gqa"))
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--data", "gqa:NoSuchTask"], r"unknown GQA task 'NoSuchTask' in 'gqa:NoSuchTask'; valid: gqa:ChooseAttr"),
        (["--data", "missing.csv"], r"data 'missing\.csv' is neither an existing data file \(CSV or JSONL\) nor a packaged task"),
        (["--flow", "pixels->last"], r"--flow: flow 'pixels->last': unknown position group 'pixels' at character 1; expected one of: image, question"),
        (["--engine", "turbo"], r"--engine: unknown engine 'turbo'; valid: fast, reference"),
        (["--dtype", "float8"], r"--dtype: unknown dtype 'float8'; valid: auto, float32"),
        (["--window", "0"], r"--window must be >= 1, got 0"),
        (["--attn", "flash_attention_2"], r"--attn: attention implementation 'flash_attention_2' cannot take a knockout mask"),
    ],
)
def test_bad_settings_are_refused_before_any_work(tiny_checkpoint, tmp_path, one_sample_csv, capsys, args, message):
    base = ["flows", "--model", str(tiny_checkpoint("sp-gqa")), "--data", str(one_sample_csv), "--out", str(tmp_path / "runs"), "--device", "cpu"]
    code, text = _cli(base + args, capsys)
    assert code == 2
    assert re.search(message, text), text
    assert not (tmp_path / "runs").exists()
