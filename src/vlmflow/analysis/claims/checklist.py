"""The checklist: each claim of the paper with its rule in words, the thresholds the rules use, and
the outcome of one evaluation."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from vlmflow.errors import ConfigError


class Status(StrEnum):
    """Outcome of one claim."""

    HOLDS = "holds"
    FAILS = "does not hold"
    NOT_RUN = "not run"


@dataclass(frozen=True)
class ClaimThresholds:
    """Numbers the rules compare against (percentages are of the answer probability).

    Attributes:
        majority_accuracy: baseline: "most questions answered correctly" means accuracy >= this.
        capitalized_share: baseline: the first token is the capitalised answer in >= this share.
        pronounced_drop: a "pronounced dip" is a mean drop of at least this many %.
        dip: a dip counts when its mean drop is at least this many % (and significant).
        near_zero: "near zero (at most a few %)": ``|mean|`` below this at every layer.
        zero: "about 0 everywhere": ``|mean|`` below this at every layer.
        exact_zero: "exactly 0": ``|rel_change|`` of every sample below this (a window confined to
            the last layer, measured only when one exists, i.e. window 1).
        small_fraction: a curve is "small" somewhere when ``|mean|`` there is at most this fraction
            of its largest drop; it "has started" where the drop reaches this fraction.
        separation: how much a curve must recover between two dips for them to be separate.
        lower_band / middle_band / upper_band: relative-depth bands (see the module docstring).
        prob_floor: lens: "about 0" probability (%); a form that never reaches it never "rises".
        rise_fraction: lens: a form rises at the first layer where it reaches this fraction of its
            own maximum.
        option_ratio: lens: "true option >> false option" means at least this ratio at the top.
        depth_spread: cross-model: peak layers "scale with depth" when their relative depths
            differ by at most this much.
    """

    majority_accuracy: float = 0.5
    capitalized_share: float = 0.5
    pronounced_drop: float = 10.0
    dip: float = 5.0
    near_zero: float = 5.0
    zero: float = 2.0
    exact_zero: float = 1e-3
    small_fraction: float = 0.5
    separation: float = 0.5
    lower_band: float = 0.25
    middle_band: tuple[float, float] = (0.15, 0.7)
    upper_band: float = 0.75
    prob_floor: float = 1.0
    rise_fraction: float = 0.5
    option_ratio: float = 5.0
    depth_spread: float = 0.15

    def __post_init__(self) -> None:
        lo, hi = self.middle_band
        if not (0.0 <= lo < hi <= 1.0 and 0.0 < self.lower_band < 1.0 and 0.0 < self.upper_band <= 1.0):
            raise ConfigError(
                f"claims bands must be relative depths in [0, 1] with middle_band low < high; got lower_band="
                f"{self.lower_band}, middle_band={self.middle_band}, upper_band={self.upper_band}"
            )
        if not 0.0 < self.separation < 1.0 or not 0.0 < self.small_fraction < 1.0 or not 0.0 < self.rise_fraction <= 1.0:
            raise ConfigError("claims separation, small_fraction and rise_fraction must lie in (0, 1)")


@dataclass(frozen=True)
class Claim:
    """One line of the checklist: identifier, the paper's wording, and the rule in words."""

    id: str
    text: str
    rule: str


@dataclass
class ClaimResult:
    """A claim evaluated on one model x task (or on the whole study).

    ``conditions`` lists ``(condition in words, passed or None if it could not be checked)``;
    ``numbers`` holds the evidence as plain numbers (JSON-able).
    """

    claim: Claim
    status: Status
    evidence: str
    conditions: list[tuple[str, bool | None]] = field(default_factory=list)
    numbers: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {
            "id": self.claim.id,
            "claim": self.claim.text,
            "status": self.status.value,
            "evidence": self.evidence,
            "conditions": [{"condition": c, "passed": p} for c, p in self.conditions],
            "numbers": self.numbers,
        }


CLAIMS: dict[str, Claim] = {
    c.id: c
    for c in (
        Claim(
            "baseline-accuracy",
            "Baseline: with the exact prompt and greedy decoding, most questions are answered correctly.",
            "accuracy (exact match of the decoded answer) >= majority_accuracy.",
        ),
        Claim(
            "baseline-capitalized",
            "Baseline: the first generated token is the capitalised answer's first sub-token (Vicuna).",
            "among correctly answered samples, the share whose first generated token is the first sub-token of "
            "answer.capitalize() >= capitalized_share (needs the lens run, which records the token ids).",
        ),
        Claim(
            "question-last",
            "Question↛Last: a pronounced dip confined to a middle/upper band of layers; it starts after the "
            "Image↛Question stages and is small in the lowest and top layers.",
            "largest drop >= pronounced_drop and significant; its layer at relative depth >= lower_band; |mean| at "
            "the lowest and the top layer <= small_fraction x the largest drop; the drop starts (first layer "
            "reaching small_fraction of it) after the first Image↛Question dip (when that flow was run).",
        ),
        Claim(
            "image-last",
            "Image↛Last: near zero at all layers (at most a few %).",
            "|mean| <= near_zero at every layer.",
        ),
        Claim("last-last", "Last↛Last: about 0 everywhere.", "|mean| <= zero at every layer."),
        Claim(
            "image-question",
            "Image↛Question: two separate dips, a larger one in the lowest layers and a second one in the middle "
            "layers; back to about 0 in the upper layers, exactly 0 for a window confined to the last layer.",
            "at least two separate dips (find_dips with dip, separation); the first at relative depth <= "
            "lower_band and the deepest; a later one inside middle_band; |mean| <= near_zero at relative depth >= "
            "upper_band; every sample's |change| <= exact_zero for a window confined to the last layer (checked "
            "only when such a window exists, i.e. window 1).",
        ),
        Claim(
            "other-question",
            "Other Image Patches↛Question carries the lower-layer dip.",
            "at the lower-layer dip (the first Image↛Question dip, else Other's largest drop below lower_band) "
            "Other's drop >= dip and significant, and larger than Related's there (when run).",
        ),
        Claim(
            "related-question",
            "Related Image Patches↛Question carries the middle-layer dip, although it blocks far fewer tokens.",
            "at the middle-layer dip (the Image↛Question dip inside middle_band, else Related's largest drop "
            "there) Related's drop >= dip and significant, and at least Other's there (when run); Related blocks "
            "fewer tokens than Other (reported).",
        ),
        Claim(
            "random-control",
            "Control (not in the paper): related patches matter more than as many random non-related patches.",
            "at the middle-layer dip, Related's drop is >= dip and related minus size-matched random (paired by "
            "sample, random averaged over draws) is negative with its interval below zero.",
        ),
        Claim(
            "lens-low",
            "Logit lens (last position, no final norm below the top): answer probability about 0 in lower layers.",
            "raw readout: the answer's probability (either case, per sample) <= prob_floor at every layer of "
            "relative depth < lower_band.",
        ),
        Claim(
            "lens-lowercase-first",
            "Logit lens: the lowercase form rises first, in the middle/upper layers after the Question→Last transfer.",
            "the lowercase answer rises (reaches rise_fraction of its maximum, which is >= prob_floor) at relative "
            "depth >= lower_band, before the capitalised form rises (or the capitalised form never does), and "
            "after the Question↛Last drop has started (when run).",
        ),
        Claim(
            "lens-capitalized-last",
            "Logit lens: the capitalised form overtakes in the last few layers.",
            "at the top layer the capitalised form is more probable than the lowercase one, and it stays ahead "
            "from a layer at relative depth >= upper_band on.",
        ),
        Claim(
            "lens-true-false",
            "Logit lens: true option >> false option for Choose tasks.",
            "at the top layer, P(answer, either case) >= option_ratio x P(false option, either case) and >= "
            "prob_floor; not run for tasks without a false option.",
        ),
        Claim(
            "ordering",
            "Stage order: whole-image (lower) dip, then the object-specific (middle) dip, then Question→Last, "
            "then the answer emerges.",
            "first Image↛Question dip < the middle-layer dip (when found) < Question↛Last's largest drop <= the "
            "layer where the lowercase answer rises (lens, when run).",
        ),
    )
}

STUDY_CLAIMS: dict[str, Claim] = {
    c.id: c
    for c in (
        Claim(
            "consistency",
            "The same ordering holds for all models and tasks; layer positions scale with depth.",
            "'ordering' holds for every model x task where it was evaluated; per task, the relative depths of "
            "Question↛Last's largest drop and of the first Image↛Question dip differ across models by at most "
            "depth_spread (needs two models).",
        ),
        Claim(
            "nohd-nopad",
            "Sanity: with noHD_noPad, LLaVA-1.6/NeXT use 576 tokens and the conclusions survive.",
            "two model entries with the same checkpoint and different image_mode: every claim has the same status "
            "for both, on every task.",
        ),
    )
}
