"""Every claims rule on synthetic result tables where the answer is known, both ways, and 'not run'."""

from __future__ import annotations

import numpy as np
import pytest
from claims_tables import CENTRES, J, bump, paper_like, sig, tables

from vlmflow.analysis.claims import CLAIMS, RULES, ClaimThresholds, Status, evaluate_cell, evaluate_study
from vlmflow.analysis.evidence import cell_evidence
from vlmflow.analysis.stats import Bootstrap
from vlmflow.errors import ConfigError
from vlmflow.positions.groups import Flow, Group

BOOT = Bootstrap(n_boot=300)


def evaluate(curves, drop=(), **kwargs):
    frames = tables({k: v for k, v in curves.items() if k not in drop}, **kwargs)
    ev = cell_evidence("m", "ChooseAttr", boot=BOOT, **frames)
    return {r.claim.id: r for r in evaluate_cell(ev)}, ev


@pytest.fixture(scope="module")
def paper():
    return evaluate(paper_like())[0]


def test_every_claim_holds_on_paper_like_results(paper):
    assert set(paper) == set(CLAIMS) == set(RULES)
    failing = {k: (r.status.value, r.evidence, r.conditions) for k, r in paper.items() if r.status is not Status.HOLDS}
    assert not failing


def changed(**curves):
    base = paper_like()
    base.update(curves)
    return base


# (claim, how the paper-like results are changed, why it must then fail)
FAILING = [
    ("baseline-accuracy", {"correct": 15}, "15/40 correct"),
    ("baseline-capitalized", {"capitalized": 10}, "only 10/40 first tokens capitalised"),
    ("question-last", {"curves": changed(**{"question->last": bump(CENTRES, 9, 2, -4)})}, "dip too shallow"),
    ("question-last", {"curves": changed(**{"question->last": bump(CENTRES, 1, 2, -40)})}, "dip in the lowest layers"),
    ("question-last", {"curves": changed(**{"question->last": np.linspace(-5, -40, 16)})}, "large at the top layer"),
    ("image-last", {"curves": changed(**{"image->last": bump(CENTRES, 8, 2, -12)})}, "12% drop"),
    ("last-last", {"curves": changed(**{"last->last": bump(CENTRES, 8, 2, -4)})}, "4% drop"),
    ("image-question", {"curves": changed(**{"image->question": bump(CENTRES, 1, 1.2, -50)})}, "one dip only"),
    ("image-question", {"curves": changed(**{"image->question": bump(CENTRES, 1, 1.2, -15) + bump(CENTRES, 6, 1, -40)})}, "middle dip larger"),
    ("image-question", {"curves": changed(**{"image->question": bump(CENTRES, 1, 1.2, -50) + bump(CENTRES, 6, 1, -20) + bump(CENTRES, 14, 1, -15)})}, "not back to 0 at the top"),
    ("other-question", {"curves": changed(**{"other->question": bump(CENTRES, 6, 1, -20)})}, "Other has no lower dip"),
    ("related-question", {"curves": changed(**{"related->question": bump(CENTRES, 1, 1.2, -20)})}, "Related has no middle dip"),
    ("random-control", {"curves": changed(**{"random->question": bump(CENTRES, 6, 1.0, -18)})}, "random patches hurt as much"),
    (
        "random-control",
        {"curves": changed(**{"related->question": bump(CENTRES, 6, 1.0, -2), "random->question": bump(CENTRES, 6, 1.0, 3)})},
        "no real related effect to control",
    ),
    ("lens-low", {"curves": changed(**{"lens:answer": np.full(17, 20.0)})}, "answer probable from the start"),
    ("lens-lowercase-first", {"curves": changed(**{"lens:answer": 60 * sig((J - 15.5) * 3)})}, "lowercase rises after capitalised"),
    ("lens-lowercase-first", {"curves": changed(**{"lens:answer": 60 * sig((J - 4) * 3) * (1 - sig((J - 15) * 3))})}, "rises before Question->Last"),
    ("lens-capitalized-last", {"curves": changed(**{"lens:answer_capitalized": np.full(17, 0.5)})}, "capitalised never overtakes"),
    ("lens-capitalized-last", {"curves": changed(**{"lens:answer_capitalized": 80 * sig((J - 6) * 3)})}, "capitalised ahead from the middle"),
    ("lens-true-false", {"curves": changed(**{"lens:false_option": 50 * sig((J - 14.5) * 3)})}, "false option as probable"),
    ("ordering", {"curves": changed(**{"question->last": bump(CENTRES, 4, 1.5, -40)})}, "Question->Last before the middle dip"),
]


@pytest.mark.parametrize(("claim", "change", "why"), FAILING, ids=[f"{c}-{w}" for c, _, w in FAILING])
def test_each_claim_fails_when_its_rule_is_violated(claim, change, why):
    change = dict(change)
    results, _ = evaluate(change.pop("curves", paper_like()), **change)
    result = results[claim]
    assert result.status is Status.FAILS, (why, result.evidence, result.conditions)
    assert any(passed is False for _, passed in result.conditions)


NOT_RUN = [
    ("question-last", ["question->last"]),
    ("image-last", ["image->last"]),
    ("last-last", ["last->last"]),
    ("image-question", ["image->question"]),
    ("other-question", ["other->question"]),
    ("related-question", ["related->question"]),
    ("random-control", ["random->question"]),
    ("baseline-capitalized", ["lens:answer", "lens:answer_capitalized", "lens:false_option", "lens:false_option_capitalized", "lens:generated"]),
    ("lens-low", ["lens:answer", "lens:answer_capitalized", "lens:false_option", "lens:false_option_capitalized", "lens:generated"]),
    ("lens-true-false", ["lens:false_option", "lens:false_option_capitalized"]),
    ("ordering", ["image->question"]),
]


@pytest.mark.parametrize(("claim", "drop"), NOT_RUN, ids=[c for c, _ in NOT_RUN])
def test_a_claim_whose_experiment_is_missing_is_not_run(claim, drop):
    results, _ = evaluate(paper_like(), drop=drop)
    assert results[claim].status is Status.NOT_RUN
    assert results[claim].evidence  # says why


def test_optional_conditions_are_skipped_not_failed_when_their_flow_is_missing():
    results, _ = evaluate(paper_like(), drop=["image->question"])
    q2l = results["question-last"]
    assert q2l.status is Status.HOLDS
    assert any(passed is None for _, passed in q2l.conditions)


def test_exact_zero_for_a_window_confined_to_the_last_layer_is_checked_when_measured():
    curves = paper_like()
    results, ev = evaluate(curves, window=1, noise=0.5)
    assert Flow(Group.IMAGE, Group.QUESTION) in ev.exact_last
    # The synthetic last-layer value is noise (not exactly 0), so this condition must fail.
    assert results["image-question"].status is Status.FAILS
    curves["image->question"][-1] = 0.0
    results, ev = evaluate(curves, window=1, noise=0.0)
    assert ev.exact_last[Flow(Group.IMAGE, Group.QUESTION)] == 0.0
    assert results["image-question"].status is Status.HOLDS


def test_study_consistency_compares_relative_depths_across_models():
    a = cell_evidence("a", "ChooseAttr", boot=BOOT, **tables(paper_like()))
    b = cell_evidence("b", "ChooseAttr", boot=BOOT, **tables(paper_like(), seed=1))
    results = {("a", "ChooseAttr"): evaluate_cell(a), ("b", "ChooseAttr"): evaluate_cell(b)}
    consistency, nohd = evaluate_study([a, b], results)
    assert consistency.status is Status.HOLDS and nohd.status is Status.NOT_RUN
    shifted = changed(**{"question->last": bump(CENTRES, 12, 1.5, -40)})
    c = cell_evidence("c", "ChooseAttr", boot=BOOT, **tables(shifted))
    results[("c", "ChooseAttr")] = evaluate_cell(c)
    consistency, _ = evaluate_study([a, b, c], results)
    assert consistency.status is Status.FAILS


def test_nohd_compares_the_conclusions_of_two_variants():
    a = cell_evidence("a", "T", boot=BOOT, **tables(paper_like()))
    b = cell_evidence("b", "T", boot=BOOT, **tables(changed(**{"image->last": bump(CENTRES, 8, 2, -12)})))
    same = {("a", "T"): evaluate_cell(a), ("b", "T"): evaluate_cell(a)}
    assert evaluate_study([a], same, variants=[("a", "b")])[1].status is Status.HOLDS
    differ = {("a", "T"): evaluate_cell(a), ("b", "T"): evaluate_cell(b)}
    result = evaluate_study([a, b], differ, variants=[("a", "b")])[1]
    assert result.status is Status.FAILS and "image-last" in result.evidence


def test_thresholds_are_validated():
    with pytest.raises(ConfigError, match="middle_band"):
        ClaimThresholds(middle_band=(0.7, 0.2))
    with pytest.raises(ConfigError, match="separation"):
        ClaimThresholds(separation=1.5)


def test_thresholds_change_the_verdict():
    curves = changed(**{"image->last": np.full(16, -4.0)})
    results, ev = evaluate(curves)
    assert results["image-last"].status is Status.HOLDS
    strict = {r.claim.id: r for r in evaluate_cell(ev, ClaimThresholds(near_zero=2.0))}
    assert strict["image-last"].status is Status.FAILS


def test_every_rule_is_documented():
    from pathlib import Path

    from vlmflow.analysis.claims import STUDY_CLAIMS

    doc = (Path(__file__).resolve().parents[3] / "docs" / "study.md").read_text()
    for claim in [*CLAIMS, *STUDY_CLAIMS]:
        assert f"| `{claim}` |" in doc, claim
    for field in ClaimThresholds.__dataclass_fields__:
        assert f"`{field}`" in doc, field
