"""The self-test every run performs on the loaded model before its first sample.

A knockout that silently does nothing is the worst failure this toolkit can have: every number would
look plausible and mean nothing. So before any work the runner checks, on the loaded model, through
the engine the run will use and with the attention kernel it was loaded with, that blocking works:

1. **Blocked means blocked.** One synthetic prompt is encoded with two different images A and B.
   The knockout *isolate* blocks every text position after the first image token from every image
   position, in every layer, so no text position can receive anything from the image. Its last-
   position logits must then be the same for A and B, while the clean logits differ between A and B
   (the image matters). If the mask did not reach the kernel, the knocked-out logits would differ as
   much as the clean ones do.
2. **The knockout has its effect.** The knocked-out logits differ from the clean ones.
3. **Nothing else changes.** A knockout of edges that do not exist in the clean model (image
   positions reading the last position, which causal attention never allows) gives back the clean
   logits: the engine's recomputation itself is exact.
4. **Blocked attention is zero.** Under the eager kernel (which returns attention probabilities) the
   reference knockout's probabilities on the blocked edges are exactly zero, and positive without
   the knockout.

The sample is built from the model's own processor, so a systematic preparation problem (such as
an image-token count that disagrees with the patch layout) also stops the run here, before any work.
Cost: a handful of forwards of one short prompt.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from PIL import Image, ImageDraw
from torch import nn

from vlmflow.data.sample import Sample
from vlmflow.errors import ConfigError, SampleError
from vlmflow.experiments.attention import eager_attention
from vlmflow.experiments.engines import ENGINES
from vlmflow.experiments.prepare import PreparedSample, prepare_sample
from vlmflow.experiments.settings import Engine
from vlmflow.knockout.reference import attention_knockout
from vlmflow.knockout.spec import Knockout
from vlmflow.loading import LoadedModel
from vlmflow.positions.groups import Group

log = logging.getLogger(__name__)

#: The knocked-out logits may move by at most this fraction of the clean image effect between A and B.
ISOLATION_TOLERANCE = 0.01
#: The no-op knockout may move the logits by at most this fraction of the clean image effect
#: (float32 agrees to ~1e-6; bfloat16 kernels differ by rounding, far below this).
NO_OP_TOLERANCE = 0.1
SELF_TEST_QUESTION = "What is in the picture?"
SELF_TEST_SIZE = (64, 48)  # (width, height): not square, so padding paths are exercised too


class SelfTestError(ConfigError):
    """The loaded model failed the knockout self-test; the run does not start."""


@dataclass(frozen=True)
class SelfTestReport:
    """What the self-test measured (max absolute differences of last-position logits).

    Attributes:
        engine: the engine tested (``fast`` or ``reference``).
        attn_implementation: the attention kernel the model runs with.
        clean_image_effect: clean logits, image A vs image B (must be clearly > 0).
        knockout_image_effect: isolating knockout, image A vs image B (must be ~0).
        knockout_effect: isolating knockout vs clean, the larger over A and B.
        no_op_error: knockout of non-existent edges vs clean (must be ~0).
        blocked_probability: largest eager attention probability on a blocked edge (must be 0).
        clean_probability: smallest total attention a target row puts on the image, clean (> 0).
        seconds: wall time of the self-test.
    """

    engine: str
    attn_implementation: str
    clean_image_effect: float
    knockout_image_effect: float
    knockout_effect: float
    no_op_error: float
    blocked_probability: float
    clean_probability: float
    seconds: float

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def self_test_images(size: tuple[int, int] = SELF_TEST_SIZE) -> tuple[Image.Image, Image.Image]:
    """Two images of the same size with different content (B is A's colour negative).

    >>> a, b = self_test_images()
    >>> a.size == b.size and a.getpixel((1, 1)) != b.getpixel((1, 1))
    True
    """
    width, height = size
    a = Image.new("RGB", size, (200, 40, 40))
    draw = ImageDraw.Draw(a)
    draw.rectangle((0, 0, width // 2, height), fill=(30, 60, 210))
    draw.ellipse((width // 4, height // 4, 3 * width // 4, 3 * height // 4), fill=(240, 230, 60))
    b = Image.eval(a, lambda v: 255 - v)
    return a, b


def _prepare(loaded: LoadedModel, image: Image.Image) -> PreparedSample:
    sample = Sample("vlmflow-self-test", "self-test", SELF_TEST_QUESTION, "picture", image_size=image.size)
    try:
        return prepare_sample(loaded, sample, image, check_answer=False)
    except SampleError as exc:
        raise SelfTestError(
            f"self-test: the model's processor and adapter cannot prepare a {image.size[0]}x{image.size[1]} image "
            f"with a short question ({exc.stage}: {exc.reason}); every sample would fail the same way"
        ) from exc


def _knockouts(prepared: PreparedSample, n_layers: int) -> tuple[Knockout, Knockout, tuple[int, ...]]:
    """``(isolate, no_op, targets)``: text after the first image token may not read any image token;
    image tokens may not read the last position (an edge causal attention never has)."""
    image = prepared.groups[Group.IMAGE]
    image_set = set(image)
    n = prepared.encoded.seq_len
    targets = tuple(p for p in range(image[0] + 1, n) if p not in image_set)
    layers = tuple(range(n_layers))
    isolate = Knockout(edges=((targets, image),), layers=layers)
    no_op = Knockout(edges=((image, (n - 1,)),), layers=layers)
    return isolate, no_op, targets


@torch.no_grad()
def _eager_probabilities(
    loaded: LoadedModel, prepared: PreparedSample, knockout: Knockout, targets: Sequence[int]
) -> tuple[float, float]:
    """``(largest blocked probability under the knockout, smallest clean image mass of a target row)``,
    over all layers and heads, from the eager kernel's attention probabilities."""
    decoder, encoded = loaded.decoder, prepared.encoded
    image = list(prepared.groups[Group.IMAGE])
    rows = list(targets)
    captured: dict[int, torch.Tensor] = {}

    def make_hook(layer: int) -> Any:
        def keep(module: nn.Module, args: tuple, output: Any) -> None:
            weights = output[1] if isinstance(output, tuple) and len(output) > 1 else None
            if weights is None:
                raise SelfTestError(f"self-test: layer {layer} returned no attention probabilities under eager attention")
            captured[layer] = weights[0][:, rows][:, :, image].float()  # [head, targets, image]

        return keep

    def run(with_knockout: bool) -> dict[int, torch.Tensor]:
        captured.clear()
        handles = [decoder.attention(layer).register_forward_hook(make_hook(layer)) for layer in range(decoder.n_layers)]
        try:
            if with_knockout:
                with attention_knockout(decoder, encoded, knockout):
                    decoder.model(**encoded.inputs, logits_to_keep=1)
            else:
                decoder.model(**encoded.inputs, logits_to_keep=1)
        finally:
            for handle in handles:
                handle.remove()
        return dict(captured)

    with eager_attention(decoder):
        blocked = run(True)
        clean = run(False)
    if len(blocked) != decoder.n_layers:
        raise SelfTestError(f"self-test: captured attention of {len(blocked)} of {decoder.n_layers} layers")
    largest = max(float(w.max()) for w in blocked.values())
    smallest = min(float(w.sum(-1).min()) for w in clean.values())
    return largest, smallest


def run_self_test(loaded: LoadedModel, engine: Engine = Engine.FAST) -> SelfTestReport:
    """Check on ``loaded`` that a knockout through ``engine`` really blocks; raise :class:`SelfTestError` if not.

    >>> report = run_self_test(loaded, "fast")   # doctest: +SKIP
    >>> report.knockout_image_effect              # doctest: +SKIP
    0.0
    """
    started = time.perf_counter()
    impl = loaded.decoder.attention_implementation
    loaded.decoder.check_attention_backend()
    image_a, image_b = self_test_images()
    prepared_a, prepared_b = _prepare(loaded, image_a), _prepare(loaded, image_b)
    if prepared_a.encoded.seq_len != prepared_b.encoded.seq_len:
        raise SelfTestError("self-test: two images of the same size gave prompts of different lengths")
    isolate, no_op, targets = _knockouts(prepared_a, loaded.n_layers)
    if not targets:
        raise SelfTestError("self-test: the prompt has no text position after the image, nothing to test")
    implementation = ENGINES[engine]
    clean_a, knocked_a = implementation.self_test_logits(loaded, prepared_a.encoded, [isolate, no_op])
    clean_b, knocked_b = implementation.self_test_logits(loaded, prepared_b.encoded, [isolate])
    for name, tensor in (("clean", clean_a), ("knocked-out", knocked_a), ("clean (image B)", clean_b)):
        if not bool(torch.isfinite(tensor).all()):
            raise SelfTestError(f"self-test: the {name} forward produced non-finite logits")
    image_effect = float((clean_a - clean_b).abs().max())
    isolation = float((knocked_a[0] - knocked_b[0]).abs().max())
    effect = max(float((knocked_a[0] - clean_a).abs().max()), float((knocked_b[0] - clean_b).abs().max()))
    no_op_error = float((knocked_a[1] - clean_a).abs().max())
    blocked_p, clean_p = _eager_probabilities(loaded, prepared_a, isolate, targets)
    report = SelfTestReport(
        engine=str(engine),
        attn_implementation=impl,
        clean_image_effect=image_effect,
        knockout_image_effect=isolation,
        knockout_effect=effect,
        no_op_error=no_op_error,
        blocked_probability=blocked_p,
        clean_probability=clean_p,
        seconds=round(time.perf_counter() - started, 3),
    )
    _judge(report)
    log.info("self-test passed: %s", report)
    return report


def _judge(r: SelfTestReport) -> None:
    """Raise :class:`SelfTestError` naming the failed check and the measured numbers."""
    where = f"engine {r.engine!r}, attention {r.attn_implementation!r}"
    scale = r.clean_image_effect
    if not scale > 1e-6:
        raise SelfTestError(
            f"self-test inconclusive ({where}): two different images give the same clean logits "
            f"(max difference {scale:.3g}), so the image does not reach the output; check the model and processor"
        )
    if not r.knockout_image_effect <= ISOLATION_TOLERANCE * scale:
        raise SelfTestError(
            f"self-test failed ({where}): with every text position blocked from the image, the output still "
            f"depends on the image (max logit difference {r.knockout_image_effect:.3g}, clean {scale:.3g}); "
            "the knockout mask does not reach the attention kernel. Use --attn eager"
        )
    if not r.knockout_effect >= 0.4 * scale:  # implied by the two checks above (triangle inequality)
        raise SelfTestError(
            f"self-test failed ({where}): the knockout changed the output by only {r.knockout_effect:.3g} "
            f"(clean image effect {scale:.3g})"
        )
    if not r.no_op_error <= NO_OP_TOLERANCE * scale:
        raise SelfTestError(
            f"self-test failed ({where}): a knockout of edges that do not exist changed the output by "
            f"{r.no_op_error:.3g} (clean image effect {scale:.3g}); the engine does not reproduce the clean model"
        )
    if r.blocked_probability != 0.0:
        raise SelfTestError(
            f"self-test failed ({where}): blocked attention is not zero (largest probability on a blocked "
            f"edge {r.blocked_probability:.3g})"
        )
    if not r.clean_probability > 0.0:
        raise SelfTestError(
            f"self-test inconclusive ({where}): in the clean model some text position puts no attention on the image"
        )
