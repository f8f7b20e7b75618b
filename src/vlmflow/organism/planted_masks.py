"""Training-time attention masks that plant routes: which edges are forbidden in which layer, and
the knockout augmentation that blocks them at random.

The planted organism's decoder has three one-layer bands (:class:`Bands`). Outside its band a route
is *forbidden*: during training it is blocked at random (an additive 4-D mask put in place by forward
pre-hooks on each decoder layer's attention, as the reference knockout engine does) so the model
cannot come to rely on it, and its open attention mass is penalised. The planted routes are never
blocked. The forbidden cells (target <- source, layer) are:

* question <- image outside the lower and middle bands; question <- other patches in the middle band;
* last <- question outside the upper band;
* last <- image, suffix <- image, suffix <- question (else information reaches the last position
  through the instruction suffix) and last <- last, in every layer.

Groups are computed from token ids (:func:`batch_groups`), the same way vlmflow's position groups
define them; :func:`check_groups` proves the equality on real questions before training starts.

>>> [c.name for c in forbidden_cells(Bands(lower=(2,), middle=(4,), upper=(6,), n_layers=8)) if c.layer == 4]
['last<-question', 'last<-image', 'suffix<-image', 'suffix<-question', 'last<-last', 'question<-other']
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from vlmflow.errors import ConfigError
from vlmflow.knockout.mask import to_kernel_mask
from vlmflow.organism.encode import QuestionBatch
from vlmflow.positions.groups import Group

#: Groups a training mask refers to (``[B, T]`` bool each in :class:`BatchGroups`).
MASK_GROUPS = ("image", "related", "other", "question", "suffix", "last")


@dataclass(frozen=True)
class Bands:
    """The planted bands of a decoder (0-based layers; the bands must not overlap).

    >>> Bands(lower=(2,), middle=(4,), upper=(6,), n_layers=8).open_to_question_from_image
    (2,)
    """

    lower: tuple[int, ...]
    middle: tuple[int, ...]
    upper: tuple[int, ...]
    n_layers: int

    def __post_init__(self) -> None:
        every = [*self.lower, *self.middle, *self.upper]
        if len(set(every)) != len(every) or any(not 0 <= x < self.n_layers for x in every):
            raise ConfigError(f"bands must be disjoint layers in 0..{self.n_layers - 1}, got {self}")
        if not (self.lower and self.middle and self.upper) or not max(self.lower) < min(self.middle) <= max(self.middle) < min(self.upper):
            raise ConfigError(f"bands must be non-empty and ordered lower < middle < upper, got {self}")

    @property
    def open_to_question_from_image(self) -> tuple[int, ...]:
        return self.lower


@dataclass(frozen=True)
class Cell:
    """One forbidden (route, layer) cell: ``target`` rows may not attend to ``source`` columns in ``layer``."""

    target: str
    source: str
    layer: int

    @property
    def name(self) -> str:
        return f"{self.target}<-{self.source}"


def forbidden_cells(bands: Bands) -> list[Cell]:
    """Every forbidden cell of a decoder with these bands, layer by layer."""
    cells: list[Cell] = []
    for layer in range(bands.n_layers):
        if layer not in bands.upper:
            cells.append(Cell("last", "question", layer))
        cells += [Cell("last", "image", layer), Cell("suffix", "image", layer), Cell("suffix", "question", layer)]
        cells.append(Cell("last", "last", layer))
        if layer in bands.middle:
            cells.append(Cell("question", "other", layer))
        elif layer not in bands.lower:
            cells.append(Cell("question", "image", layer))
    return cells


@dataclass
class BatchGroups:
    """Per-row group membership of a right-padded batch: ``[B, T]`` bool per name of :data:`MASK_GROUPS`."""

    masks: dict[str, torch.Tensor]

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.masks[name]


def related_patches(question: Any, grid: int, image_size: int) -> list[int]:
    """Patch indices (row-major) whose ``image_size / grid`` pixel square overlaps a box of the question's objects."""
    cell = image_size // grid
    patches: set[int] = set()
    for box in question.sample.boxes:
        cols = range(int(box.x) // cell, (int(box.x + box.w) - 1) // cell + 1)
        rows = range(int(box.y) // cell, (int(box.y + box.h) - 1) // cell + 1)
        patches.update(r * grid + c for r in rows for c in cols)
    return sorted(patches)


def batch_groups(batch: QuestionBatch, tokenizer: Any, image_token_id: int, grid: int, image_size: int) -> BatchGroups:
    """Group membership of every position of ``batch`` (prompt positions only; the answer and padding are in none).

    The question is the ``n`` tokens after the image, ``n`` being its own token count; the suffix
    runs from there to before the last prompt position.
    """
    ids = batch.input_ids
    width = ids.shape[1]
    masks = {name: torch.zeros(ids.shape, dtype=torch.bool) for name in MASK_GROUPS}
    is_image = ids == image_token_id
    for b, question in enumerate(batch.questions):
        image_pos = torch.nonzero(is_image[b]).flatten()
        first, end = int(image_pos[0]), int(image_pos[-1]) + 1
        last = int(batch.last[b])
        n_question = len(tokenizer(question.sample.question, add_special_tokens=False)["input_ids"])
        masks["image"][b, first:end] = True
        for patch in related_patches(question, grid, image_size):
            masks["related"][b, first + patch] = True
        masks["question"][b, end : end + n_question] = True
        masks["suffix"][b, end + n_question : last] = True
        masks["last"][b, last] = True
    masks["other"] = masks["image"] & ~masks["related"]
    assert all(m.shape[1] == width for m in masks.values())
    return BatchGroups(masks)


def check_groups(groups: BatchGroups, reference: Sequence[Any]) -> None:
    """Raise ``AssertionError`` unless ``groups`` equal vlmflow's position groups ``reference``
    (one :class:`~vlmflow.positions.groups.PositionGroups` per row)."""
    names = {"image": Group.IMAGE, "related": Group.RELATED, "other": Group.OTHER, "question": Group.QUESTION,
             "suffix": Group.SUFFIX, "last": Group.LAST}  # fmt: skip
    for row, positions in enumerate(reference):
        for name, group in names.items():
            ours = torch.nonzero(groups[name][row]).flatten().tolist()
            theirs = list(positions[group]) if group in positions else []
            if ours != theirs:
                raise AssertionError(f"row {row}: training group {name} is {ours}, vlmflow's is {theirs}")


def draw_blocked(cells: Sequence[Cell], batch_size: int, generator: torch.Generator, p_all: float, p_half: float) -> torch.Tensor:
    """Knockout augmentation: ``[B, n_cells]`` bool, which forbidden cells each row blocks.

    Per row: every cell with probability ``p_all``, each cell with probability 1/2 with ``p_half``,
    none otherwise.
    """
    mode = torch.rand(batch_size, generator=generator)  # [B]
    half = torch.rand(batch_size, len(cells), generator=generator) < 0.5  # [B, n_cells]
    every = (mode < p_all)[:, None].expand(-1, len(cells))
    some = ((mode >= p_all) & (mode < p_all + p_half))[:, None] & half
    return every | some


def layer_masks(groups: BatchGroups, cells: Sequence[Cell], blocked: torch.Tensor, n_layers: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per layer, the allowed edges and the open forbidden edges.

    Returns ``allowed`` ``[L, B, T, T]`` (causal minus the blocked cells) and ``open_forbidden``
    ``[L, B, T, T]`` (forbidden edges left open, where the attention-mass penalty applies).
    """
    batch, width = groups["image"].shape
    causal = torch.ones(width, width, dtype=torch.bool).tril()  # [T, T]
    allowed = causal.expand(n_layers, batch, width, width).clone()
    open_forbidden = torch.zeros(n_layers, batch, width, width, dtype=torch.bool)
    for c, cell in enumerate(cells):
        edges = groups[cell.target][:, :, None] & groups[cell.source][:, None, :] & causal  # [B, T, T]
        shut = blocked[:, c][:, None, None]  # [B, 1, 1]
        allowed[cell.layer] &= ~(edges & shut)
        open_forbidden[cell.layer] |= edges & ~shut
    return allowed, open_forbidden


@contextmanager
def masked_attention(model: nn.Module, allowed: torch.Tensor) -> Iterator[list[torch.Tensor | None]]:
    """Inside the block, decoder layer ``l``'s attention uses the additive mask of ``allowed[l]``
    (``[L, B, T, T]`` bool) and the yielded list holds each layer's attention probabilities
    ``[B, head, T, T]`` after a forward (the model must run the ``eager`` kernel). Hooks are
    removed in ``finally``.
    """
    layers = model.model.language_model.layers
    if len(layers) != allowed.shape[0]:
        raise ValueError(f"masks for {allowed.shape[0]} layers, model has {len(layers)}")
    dtype = next(model.parameters()).dtype
    kernel = to_kernel_mask(allowed[:, :, None], "eager", dtype)  # [L, B, 1, T, T]
    probs: list[torch.Tensor | None] = [None] * len(layers)
    handles = []

    def pre_hook(index: int) -> Any:
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
            kwargs["attention_mask"] = kernel[index]
            return args, kwargs

        return hook

    def keep(index: int) -> Any:
        def hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
            probs[index] = output[1]

        return hook

    try:
        for index, layer in enumerate(layers):
            handles.append(layer.self_attn.register_forward_pre_hook(pre_hook(index), with_kwargs=True))
            handles.append(layer.self_attn.register_forward_hook(keep(index), with_kwargs=True))
        yield probs
    finally:
        for handle in handles:
            handle.remove()


def forbidden_mass(probs: Sequence[torch.Tensor | None], open_forbidden: torch.Tensor) -> torch.Tensor:
    """Mean attention mass (over heads and over the query rows that have open forbidden keys) that
    rows put on open forbidden keys, summed over layers: the attention-mass penalty."""
    total = open_forbidden.new_zeros((), dtype=torch.float32)
    for layer, p in enumerate(probs):
        edges = open_forbidden[layer]  # [B, T, T]
        rows = edges.any(-1)  # [B, T]
        if p is None or not bool(rows.any()):
            continue
        mass = (p.float().mean(1) * edges).sum(-1)  # [B, T]
        total = total + mass[rows].mean()
    return total


@contextmanager
def patched_layer_input(model: nn.Module, layer: int, where: torch.Tensor, donor: torch.Tensor) -> Iterator[None]:
    """Inside the block, decoder layer ``layer`` receives ``donor`` ``[B, T, d]`` instead of its input
    hidden states where ``where`` ``[B, T]`` is True (an interchange intervention); the hook is
    removed in ``finally``."""
    mask = where[..., None]  # [B, T, 1]

    def hook(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        if args:
            return (torch.where(mask, donor, args[0]), *args[1:]), kwargs
        kwargs["hidden_states"] = torch.where(mask, donor, kwargs["hidden_states"])
        return args, kwargs

    handle = model.model.language_model.layers[layer].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


def spread_loss(probs: torch.Tensor, rows: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """How far the attention of ``rows`` is from even over ``keys``: the mean over heads and rows of
    ``-mean_k log p[k]`` over the keys, minus its minimum ``log n_keys`` (0 when every row attends
    evenly to the keys and nowhere else).

    ``probs`` ``[B, head, T, T]``; ``rows`` / ``keys`` ``[B, T]`` bool.

    >>> p = torch.tensor([[[[0.5, 0.5, 0.0], [0.5, 0.5, 0.0], [0.25, 0.25, 0.5]]]])
    >>> float(spread_loss(p, torch.tensor([[False, False, True]]), torch.tensor([[True, True, False]]))) > 0
    True
    >>> float(spread_loss(p, torch.tensor([[False, True, False]]), torch.tensor([[True, True, False]])))
    0.0
    """
    logp = torch.log(probs.float().clamp_min(1e-9))  # [B, head, T, T]
    n_keys = keys.sum(-1).clamp_min(1).float()  # [B]
    cross = -(logp * keys[:, None, None, :]).sum(-1) / n_keys[:, None, None]  # [B, head, T]
    excess = cross.mean(1) - torch.log(n_keys)[:, None]  # [B, T]
    return excess[rows].mean() if bool(rows.any()) else probs.new_zeros(())
