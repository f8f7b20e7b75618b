"""Show one sample's position groups: positions, decoded tokens, and the image patches of image groups.

What ``vlmflow groups`` prints and :func:`vlmflow.show_groups` returns: every named group (or the
expressions asked for) with its positions written as Python slices (``41:48`` is positions 41 to 47,
what ``tokens:41:48`` selects), its tokens as the tokenizer spells them, the reason a group is
missing, and for a group holding image tokens a figure of the image with those tokens' patches
outlined (:mod:`vlmflow.plots.patches`).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vlmflow.errors import SampleError
from vlmflow.positions.expressions import Expr, as_expression
from vlmflow.positions.groups import Group
from vlmflow.positions.resolve import Resolver

if TYPE_CHECKING:
    from matplotlib.figure import Figure
    from PIL import Image

    from vlmflow.experiments.prepare import PreparedSample
    from vlmflow.inputs import Visuals
    from vlmflow.loading import LoadedModel

__all__ = ["GroupView", "GroupsReport", "as_slices", "group_report"]


def as_slices(positions: Sequence[int]) -> str:
    """Positions as Python slices of consecutive runs.

    >>> as_slices([3, 4, 5, 9]), as_slices([])
    ('3:6, 9:10', '-')
    """
    if not positions:
        return "-"
    runs, start, prev = [], positions[0], positions[0]
    for p in positions[1:]:
        if p != prev + 1:
            runs.append(f"{start}:{prev + 1}")
            start = p
        prev = p
    runs.append(f"{start}:{prev + 1}")
    return ", ".join(runs)


@dataclass(frozen=True)
class GroupView:
    """One group (or expression) of the sample.

    Attributes:
        name: the group's name or the expression's text.
        positions: its sequence positions (empty when missing).
        tokens: the token at each position, as the tokenizer spells it.
        missing: why it resolves to nothing for this sample, else ``None``.
        image_tokens: per image of the prompt, the indices (in that image's token order) of its
            image tokens among ``positions``.
        pictures: where its figures were written (one per image holding some of its tokens).
    """

    name: str
    positions: tuple[int, ...]
    tokens: tuple[str, ...]
    missing: str | None = None
    image_tokens: tuple[tuple[int, ...], ...] = ()
    pictures: tuple[Path, ...] = ()

    @property
    def is_image_group(self) -> bool:
        return any(self.image_tokens)

    def line(self, width: int = 24) -> str:
        """One line of the ``vlmflow groups`` table."""
        if self.missing is not None:
            return f"{self.name:<{width}} missing: {self.missing}"
        text = " ".join(_compact(self.tokens))
        return f"{self.name:<{width}} {len(self.positions):>5}  {as_slices(self.positions)}  {text}"


@dataclass
class GroupsReport:
    """The groups of one prepared sample (what ``vlmflow groups`` prints).

    >>> print(report.table())   # doctest: +SKIP
    """

    sample_id: str
    seq_len: int
    groups: list[GroupView]
    prepared: Any = field(repr=False)
    #: One picture per image (or frame) of the prompt, in the order of ``prepared.images``.
    pictures: tuple[Any, ...] = field(default=(), repr=False)

    def __getitem__(self, name: str) -> GroupView:
        for view in self.groups:
            if view.name == name:
                return view
        raise KeyError(f"no group {name!r} in this report; groups: {', '.join(v.name for v in self.groups)}")

    def table(self) -> str:
        """The report as text: one line per group (positions as Python slices, then tokens)."""
        width = max([len(v.name) for v in self.groups] + [8])
        head = f"sample {self.sample_id}: {self.seq_len} positions; positions are Python slices (41:48 = 41..47 = tokens:41:48)"
        return "\n".join([head, *(v.line(width) for v in self.groups)])

    def figure(self, name: str, image_index: int = 0) -> Figure:
        """The image with the patches of group ``name``'s image tokens outlined."""
        from vlmflow.plots.patches import outline_figure, patch_rectangles

        view = self[name]
        placed = self.prepared.images[image_index]
        if placed.layout is None or image_index >= len(self.pictures):
            raise SampleError(f"no patch layout for image {image_index} of this sample", stage="groups")
        rects = patch_rectangles(placed.layout, placed.size)
        tokens = view.image_tokens[image_index] if image_index < len(view.image_tokens) else ()
        return outline_figure(self.pictures[image_index], rects, tokens, f"{self.sample_id}: {name}")


def group_report(
    loaded: LoadedModel,
    prepared: PreparedSample,
    expressions: Sequence[Expr | str] | None = None,
    *,
    visuals: Image.Image | Visuals | None = None,
    out: Path | None = None,
) -> GroupsReport:
    """The groups of ``prepared`` (every named group, or ``expressions``); with ``out`` and the sample's
    ``visuals`` (what :func:`~vlmflow.experiments.prepare.open_visuals` opened), a PNG per image or
    frame that holds some of an image group's tokens.

    >>> group_report(loaded, prepared, ['text:"red"', "image[0] & related"]).table()   # doctest: +SKIP
    """
    names: list[Expr] = list(Group) if expressions is None else [as_expression(e) for e in expressions]
    resolver = Resolver(prepared)
    ids = prepared.encoded.input_ids.tolist()
    spelled = [str(t) for t in loaded.tokenizer.convert_ids_to_tokens(ids)]
    views = []
    for expr in names:
        try:
            positions = resolver.positions(expr)
        except SampleError as exc:
            views.append(GroupView(str(expr), (), (), missing=exc.reason))
            continue
        chosen = set(positions)
        image_tokens = tuple(tuple(i for i, p in enumerate(img.positions) if p in chosen) for img in prepared.images)
        views.append(GroupView(str(expr), positions, tuple(spelled[p] for p in positions), image_tokens=image_tokens))
    pictures = () if visuals is None else _pictures(visuals, loaded.inputs.visual_blocks(prepared.encoded))
    report = GroupsReport(prepared.sample.sample_id, prepared.encoded.seq_len, views, prepared, pictures)
    if out is not None and pictures:
        out.mkdir(parents=True, exist_ok=True)
        for i, view in enumerate(report.groups):
            if not view.is_image_group:
                continue
            paths = []
            for k, tokens in enumerate(view.image_tokens):
                if not tokens:
                    continue
                path = out / f"{_slug(report.sample_id)}-{_slug(view.name)}{'' if k == 0 else f'-image{k}'}.png"
                report.figure(view.name, k).savefig(path, dpi=120)
                paths.append(path)
            report.groups[i] = GroupView(**{**view.__dict__, "pictures": tuple(paths)})
    return report


def _pictures(visuals: Any, blocks: Sequence[Any]) -> tuple[Any, ...]:
    """The picture each visual block shows: its image, or for a video the first input frame folded into it."""
    from vlmflow.inputs import Visuals

    if not isinstance(visuals, Visuals):  # one image
        return (visuals,) * len(blocks)
    if visuals.video is not None:
        return tuple(visuals.video.frames[block.sources[0]] for block in blocks)
    return tuple(visuals.images[block.image] for block in blocks)


def _compact(tokens: Sequence[str]) -> list[str]:
    """Runs of one repeated token (image tokens) as ``TOKEN x N``."""
    out: list[str] = []
    i = 0
    while i < len(tokens):
        j = i
        while j < len(tokens) and tokens[j] == tokens[i]:
            j += 1
        out.append(tokens[i] if j - i < 3 else f"{tokens[i]}x{j - i}")
        i = j
    return out


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.]+", "-", text).strip("-")[:60] or "group"
