"""Synthetic shape scenes: a few coloured shapes on a grid, rendered with exact bounding boxes.

A :class:`Scene` places each shape inside its own cell of a ``grid x grid`` layout (default: a 64x64
image, a 4x4 grid of 16-pixel cells, so with a 16-pixel vision patch every object lies inside exactly
one image token's patch). Shapes in one scene are all different, so "the circle" always names one
object. An object's :class:`~vlmflow.data.sample.Box` is the extent of the pixels drawn for it (top
left corner, width, height, in image pixels), computed from the rendering itself.

Everything is a pure function of its inputs: :func:`random_scene` draws from the ``random.Random`` it
is given, and :meth:`Scene.render` draws the same pixels every time (no anti-aliasing).

>>> import random
>>> scene = random_scene(random.Random(0), n_objects=3)
>>> len(scene.objects), scene.render().size
(3, (64, 64))
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

from PIL import Image, ImageDraw

from vlmflow.data.sample import Box

#: Shape names, in the order of their class index (auxiliary losses use it).
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "cross")

#: Colour names and the RGB they are drawn in.
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "blue": (30, 70, 220),
    "green": (30, 160, 60),
    "yellow": (235, 200, 20),
}

#: Size names and the side (pixels) of the square each shape is drawn in, per size.
SIZES: dict[str, tuple[int, ...]] = {"small": (8, 9), "large": (12, 13)}

BACKGROUND: tuple[int, int, int] = (245, 245, 245)


@dataclass(frozen=True)
class SceneShape:
    """One object of a scene.

    Attributes:
        shape / color / size: names from :data:`SHAPES`, :data:`COLORS`, :data:`SIZES`.
        row / col: its grid cell (0-based, row 0 at the top, column 0 at the left).
        side: side of the square it is drawn in (pixels; one of ``SIZES[size]``).
        dx / dy: offset of that square inside the cell (pixels, at least 1 from every cell edge).
        object_id: identifier written to the task CSV (unique within the scene).
    """

    shape: str
    color: str
    size: str
    row: int
    col: int
    side: int
    dx: int
    dy: int
    object_id: str = ""

    def __post_init__(self) -> None:
        for value, valid, what in ((self.shape, SHAPES, "shape"), (self.color, COLORS, "color"), (self.size, SIZES, "size")):
            if value not in valid:
                raise ValueError(f"unknown {what} {value!r}; valid: {', '.join(valid)}")
        if self.side not in SIZES[self.size]:
            raise ValueError(f"side {self.side} is not a {self.size} side; valid: {SIZES[self.size]}")

    @property
    def attributes(self) -> tuple[str, str]:
        """``(size, color)``, e.g. ``("small", "red")``."""
        return (self.size, self.color)

    def description(self) -> str:
        """``"small red circle"``."""
        return f"{self.size} {self.color} {self.shape}"


@dataclass(frozen=True)
class Scene:
    """Objects on a grid. ``objects`` have distinct shapes and distinct cells.

    >>> s = Scene((SceneShape("square", "red", "large", 1, 2, 12, 2, 2, "0"),))
    >>> s.box(s.objects[0])
    Box(x=34, y=18, w=12, h=12)
    >>> s.horizontal_side(s.objects[0])
    'right'
    """

    objects: tuple[SceneShape, ...]
    image_size: int = 64
    grid: int = 4
    _boxes: dict[str, Box] = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.image_size % self.grid:
            raise ValueError(f"image_size {self.image_size} is not a multiple of grid {self.grid}")
        shapes = [o.shape for o in self.objects]
        if len(set(shapes)) != len(shapes):
            raise ValueError(f"shapes in a scene must be distinct, got {shapes}")
        cells = [(o.row, o.col) for o in self.objects]
        if len(set(cells)) != len(cells):
            raise ValueError(f"objects must occupy distinct cells, got {cells}")
        for o in self.objects:
            if not (0 <= o.row < self.grid and 0 <= o.col < self.grid):
                raise ValueError(f"cell ({o.row}, {o.col}) is outside the {self.grid}x{self.grid} grid")
            if o.dx < 1 or o.dy < 1 or o.dx + o.side > self.cell - 1 or o.dy + o.side > self.cell - 1:
                raise ValueError(f"{o.description()} does not keep a 1-pixel margin inside its {self.cell}-pixel cell")

    @property
    def cell(self) -> int:
        """Side of one grid cell in pixels."""
        return self.image_size // self.grid

    def find(self, shape: str) -> SceneShape | None:
        """The object with this shape, or ``None``."""
        return next((o for o in self.objects if o.shape == shape), None)

    def with_color(self, color: str) -> list[SceneShape]:
        """Objects of this colour."""
        return [o for o in self.objects if o.color == color]

    def horizontal_side(self, obj: SceneShape) -> str:
        """``"left"`` for the left half of the grid's columns, else ``"right"``."""
        return "left" if obj.col < self.grid // 2 else "right"

    def box(self, obj: SceneShape) -> Box:
        """The extent of the pixels drawn for ``obj`` (cached)."""
        key = obj.object_id or obj.shape
        if key not in self._boxes:
            mask = Image.new("L", (self.image_size, self.image_size), 0)
            _draw_shape(ImageDraw.Draw(mask), obj, self._origin(obj), 255)
            left, top, right, bottom = mask.getbbox()  # a drawn shape always has pixels
            self._boxes[key] = Box(left, top, right - left, bottom - top)
        return self._boxes[key]

    def _origin(self, obj: SceneShape) -> tuple[int, int]:
        return (obj.col * self.cell + obj.dx, obj.row * self.cell + obj.dy)

    def render(self) -> Image.Image:
        """The RGB image (``image_size`` square), background :data:`BACKGROUND`."""
        image = Image.new("RGB", (self.image_size, self.image_size), BACKGROUND)
        draw = ImageDraw.Draw(image)
        for obj in self.objects:
            _draw_shape(draw, obj, self._origin(obj), COLORS[obj.color])
        return image


def _draw_shape(draw: ImageDraw.ImageDraw, obj: SceneShape, origin: tuple[int, int], fill: object) -> None:
    """Draw ``obj`` in the ``side`` x ``side`` square whose top-left pixel is ``origin``."""
    x, y = origin
    s = obj.side - 1  # last pixel offset inside the square
    if obj.shape == "square":
        draw.rectangle((x, y, x + s, y + s), fill=fill)
    elif obj.shape == "circle":
        draw.ellipse((x, y, x + s, y + s), fill=fill)
    elif obj.shape == "triangle":
        draw.polygon([(x, y + s), (x + s, y + s), (x + s / 2, y)], fill=fill)
    elif obj.shape == "star":
        cx, cy, outer = x + s / 2, y + s / 2, s / 2
        points = []
        for k in range(10):
            radius = outer if k % 2 == 0 else outer * 0.45
            angle = -math.pi / 2 + k * math.pi / 5
            points.append((cx + radius * math.cos(angle), cy + radius * math.sin(angle)))
        draw.polygon(points, fill=fill)
    elif obj.shape == "cross":
        arm = max(2, round(obj.side / 3))
        lo = x + (obj.side - arm) // 2
        draw.rectangle((lo, y, lo + arm - 1, y + s), fill=fill)
        lo = y + (obj.side - arm) // 2
        draw.rectangle((x, lo, x + s, lo + arm - 1), fill=fill)
    else:  # pragma: no cover - SceneShape validates the name
        raise ValueError(f"unknown shape {obj.shape!r}")


def place(rng: random.Random, shape: str, color: str, size: str, row: int, col: int, cell: int = 16) -> SceneShape:
    """A :class:`SceneShape` with a random side of its size and a random offset inside its cell."""
    side = rng.choice(SIZES[size])
    return SceneShape(
        shape=shape,
        color=color,
        size=size,
        row=row,
        col=col,
        side=side,
        dx=rng.randint(1, cell - 1 - side),
        dy=rng.randint(1, cell - 1 - side),
    )


def random_scene(
    rng: random.Random,
    n_objects: int,
    *,
    fixed: Sequence[dict[str, object]] = (),
    exclude: Sequence[str] = (),
    image_size: int = 64,
    grid: int = 4,
) -> Scene:
    """A scene of ``n_objects`` with distinct shapes in distinct cells.

    Args:
        rng: the only source of randomness.
        n_objects: total number of objects (``len(fixed) <= n_objects <= len(SHAPES)``).
        fixed: partial specifications of the first objects, as keyword dicts with any of ``shape``,
            ``color``, ``size``, ``col``, ``row``; unspecified fields are drawn at random. The other
            objects get shapes not used by any fixed object.
        exclude: shapes no object without a fixed shape may take.

    The objects of the result keep the order of ``fixed`` first; ids are ``"0"``, ``"1"``, ...

    >>> s = random_scene(random.Random(1), 2, fixed=[{"shape": "star", "color": "red"}])
    >>> s.objects[0].shape, s.objects[0].color, len(s.objects)
    ('star', 'red', 2)
    """
    if not len(fixed) <= n_objects <= len(SHAPES):
        raise ValueError(f"n_objects must be between {len(fixed)} and {len(SHAPES)}, got {n_objects}")
    cell = image_size // grid
    named = [f["shape"] for f in fixed if "shape" in f]
    free_shapes = [s for s in SHAPES if s not in named and s not in exclude]
    rng.shuffle(free_shapes)
    specs = [dict(f) for f in fixed] + [{} for _ in range(n_objects - len(fixed))]
    for spec in specs:
        if "shape" not in spec:
            if not free_shapes:
                raise ValueError(f"not enough shapes for {n_objects} objects without {list(exclude)}")
            spec["shape"] = free_shapes.pop()
    taken: set[tuple[int, int]] = set()
    # Objects with a fixed column or row are placed first, so free ones cannot take their only cells.
    order = sorted(range(len(specs)), key=lambda i: -(("col" in specs[i]) + ("row" in specs[i])))
    cells: dict[int, tuple[int, int]] = {}
    for i in order:
        spec = specs[i]
        rows = [int(spec["row"])] if "row" in spec else list(range(grid))  # type: ignore[call-overload]
        cols = [int(spec["col"])] if "col" in spec else list(range(grid))  # type: ignore[call-overload]
        free = [(r, c) for r in rows for c in cols if (r, c) not in taken]
        if not free:
            raise ValueError(f"no free cell for {spec}")
        cells[i] = rng.choice(free)
        taken.add(cells[i])
    objects = []
    for i, spec in enumerate(specs):
        row, col = cells[i]
        obj = place(
            rng,
            str(spec["shape"]),
            str(spec.get("color") or rng.choice(list(COLORS))),
            str(spec.get("size") or rng.choice(list(SIZES))),
            row,
            col,
            cell,
        )
        objects.append(replace(obj, object_id=str(i)))
    return Scene(tuple(objects), image_size=image_size, grid=grid)
