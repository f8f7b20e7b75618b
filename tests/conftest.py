"""Shared fixtures: tiny random LLaVA checkpoints saved to disk and loaded back like a user's.

Everything runs offline on CPU: checkpoints are built from configs (random weights) with offline
tokenizers, saved with ``save_pretrained`` and loaded through :func:`vlmflow.load_model`.

Tests write files only under pytest's temporary folders, or what they keep for a person to look at
(screenshots, the organism's checklist) under :func:`test_artifacts`; a session that leaves a new
file or folder in the repository fails (:func:`_repository_stays_clean`).
"""

from __future__ import annotations

import os
import subprocess

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from collections.abc import Callable  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from vlmflow.tiny.llava import TinyLlavaConfig, build_tiny_llava  # noqa: E402

# One intra-op thread: the models are tiny, so a second thread buys little, and on a shared 2-core
# machine two spinning threads per process slow the suite down several times over.
torch.set_num_threads(1)

REPO = Path(__file__).resolve().parents[1]

#: Model shapes the engine is checked on: SentencePiece + grouped-query attention, byte-level BPE +
#: multi-head attention with 7-px patches, word-level + one KV head and more layers.
TINY_SHAPES: dict[str, TinyLlavaConfig] = {
    "sp-gqa": TinyLlavaConfig(tokenizer="sentencepiece", layers=4, hidden=64, heads=4, kv_heads=2),
    "bpe-mha": TinyLlavaConfig(
        tokenizer="bytelevel", layers=5, hidden=48, heads=3, kv_heads=3, image_size=28, patch_size=7, seed=1
    ),
    "word-mqa": TinyLlavaConfig(
        tokenizer="word", layers=6, hidden=32, heads=2, kv_heads=1, intermediate=64, image_size=24, patch_size=4, seed=2
    ),
}


def _untracked_in_repository() -> set[str] | None:
    """Untracked and ignored entries of the repository (folders as one entry), None outside git."""
    try:
        done = subprocess.run(
            ["git", "status", "--porcelain", "--ignored"], cwd=REPO, capture_output=True, text=True, timeout=60, check=False
        )
    except OSError:
        return None
    if done.returncode != 0:
        return None
    caches = ("__pycache__", ".pytest_cache", ".ruff_cache")
    return {line[3:] for line in done.stdout.splitlines() if line[:2] in ("??", "!!") and not any(c in line for c in caches)}


@pytest.fixture(scope="session", autouse=True)
def _repository_stays_clean():
    """The test session leaves no new file or folder in the repository (not even an ignored one)."""
    before = _untracked_in_repository()
    yield
    after = _untracked_in_repository()
    if before is not None and after is not None and after - before:
        pytest.fail(f"the tests left files in the repository (write them under tmp_path or test_artifacts): {sorted(after - before)}")


@pytest.fixture(scope="session")
def test_artifacts(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where tests keep files for a person to look at: ``$VLMFLOW_TEST_ARTIFACTS``, else a temporary folder."""
    folder = os.environ.get("VLMFLOW_TEST_ARTIFACTS")
    if not folder:
        return tmp_path_factory.mktemp("test-artifacts")
    Path(folder).mkdir(parents=True, exist_ok=True)
    return Path(folder)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """``tiny_checkpoint(shape_name)`` -> directory of a saved tiny LLaVA (built once per session)."""
    cache: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in cache:
            path = tmp_path_factory.mktemp(f"tiny-{name}")
            build_tiny_llava(TINY_SHAPES[name], path)
            cache[name] = path
        return cache[name]

    return get


@pytest.fixture(scope="session")
def tiny_loaded(tiny_checkpoint: Callable[[str], Path]) -> Callable[..., object]:
    """``tiny_loaded(shape, impl)`` -> a :class:`vlmflow.loading.LoadedModel` (cached per session)."""
    from vlmflow.loading import load_model

    cache: dict[tuple[str, str], object] = {}

    def get(name: str, impl: str = "sdpa") -> object:
        key = (name, impl)
        if key not in cache:
            cache[key] = load_model(tiny_checkpoint(name), device="cpu", dtype="float32", attn_implementation=impl)
        return cache[key]

    return get


def make_scene_sample(sample_id: str = "q1"):  # noqa: ANN201 - test helper
    """A non-square image (40x30: pad-to-square adds padding patches) with one boxed object."""
    from PIL import Image, ImageDraw

    from vlmflow.data.sample import Box, Sample, SceneObject, TaskType

    image = Image.new("RGB", (40, 30), (30, 120, 30))
    ImageDraw.Draw(image).rectangle((6, 8, 17, 19), fill=(220, 20, 20))
    sample = Sample(
        sample_id=sample_id,
        image_id="img1",
        question="Is the square red or blue?",
        answer="red",
        task=TaskType.CHOOSE_ATTR,
        true_option="red",
        false_option="blue",
        objects=(SceneObject("square", "1", Box(6, 8, 12, 12)),),
        image_size=(40, 30),
    )
    return sample, image


def write_scene_task(folder: Path, n_samples: int = 3) -> Path:
    """A ChooseAttr CSV in the released layout plus its images in ``folder``; returns the CSV path.

    Each sample is a plain background with one coloured square (red or blue) at its own place, on
    images of different shapes (wide, tall, square), so pad-to-square gives padding tokens and the
    related/other groups differ between samples. Test data only, not a scene generator.
    """
    from PIL import Image, ImageDraw

    from vlmflow.data.csvio import write_task_csv
    from vlmflow.data.sample import Box, Sample, SceneObject, TaskType

    folder.mkdir(parents=True, exist_ok=True)
    colours = {"red": (220, 20, 20), "blue": (20, 40, 220)}
    sizes = [(40, 30), (30, 40), (36, 36)]
    samples = []
    for i in range(n_samples):
        answer, other = ("red", "blue") if i % 2 == 0 else ("blue", "red")
        width, height = sizes[i % len(sizes)]
        side = 8 + 2 * (i % 3)
        box = Box(3 + 5 * (i % 4), 2 + 4 * (i % 3), side, side)
        image = Image.new("RGB", (width, height), (40, 130 + 10 * (i % 5), 40))
        ImageDraw.Draw(image).rectangle((box.x, box.y, box.x1 - 1, box.y1 - 1), fill=colours[answer])
        image.save(folder / f"img{i}.png")
        options = (answer, other) if i % 3 else (other, answer)
        samples.append(
            Sample(
                sample_id=f"{i:05d}",
                image_id=f"img{i}",
                question=f"Is the square {options[0]} or {options[1]}?",
                answer=answer,
                task=TaskType.CHOOSE_ATTR,
                true_option=answer,
                false_option=other,
                objects=(SceneObject("square", str(i), box),),
                image_size=(width, height),
            )
        )
    path = folder / "GQA_val_correct_question_with_choose_ChooseAttr.csv"
    write_task_csv(samples, path)
    return path


@pytest.fixture(scope="session")
def tiny_prepared(tiny_loaded: Callable[..., object]) -> Callable[..., tuple]:
    """``tiny_prepared(shape, impl)`` -> ``(loaded, prepared)`` for the scene sample."""
    from vlmflow.experiments.prepare import prepare_sample

    def get(name: str, impl: str = "sdpa") -> tuple:
        loaded = tiny_loaded(name, impl)
        sample, image = make_scene_sample()
        return loaded, prepare_sample(loaded, sample, image)

    return get



def _build_family(name: str, path: Path) -> None:
    """Save a tiny random checkpoint of family ``name`` (besides LLaVA-1.5: anyres LLaVA-NeXT, Gemma-3
    and PaliGemma with bidirectional image blocks, Idefics3 with tiles) to ``path``."""
    if name == "next":
        from support.tiny_next import TinyAnyresConfig, build_tiny_llava_next

        build_tiny_llava_next(TinyAnyresConfig(tokenizer="sentencepiece", layers=2), path)
    elif name == "gemma3":
        from support.tiny_gemma3 import TinyGemma3Config, build_tiny_gemma3

        build_tiny_gemma3(TinyGemma3Config(), path)
    elif name == "idefics3":
        from support.tiny_idefics3 import TinyIdefics3Config, build_tiny_idefics3

        build_tiny_idefics3(TinyIdefics3Config(), path)
    elif name == "paligemma":
        from support.tiny_paligemma import build_tiny_paligemma

        build_tiny_paligemma(path=path)
    else:
        raise ValueError(f"no tiny family {name!r}")


@pytest.fixture(scope="session")
def tiny_family(tmp_path_factory: pytest.TempPathFactory, tiny_loaded: Callable[..., object]) -> Callable[[str], object]:
    """``tiny_family(name)`` -> a loaded tiny model of a family (``llava``: the ``sp-gqa`` LLaVA-1.5;
    ``next``, ``gemma3``, ``idefics3``, ``paligemma``), built once per session."""
    from vlmflow.loading import load_model

    cache: dict[str, object] = {}

    def get(name: str) -> object:
        if name == "llava":
            return tiny_loaded("sp-gqa")
        if name not in cache:
            path = tmp_path_factory.mktemp(f"tiny-{name}")
            _build_family(name, path)
            cache[name] = load_model(path, device="cpu", dtype="float32")
        return cache[name]

    return get
