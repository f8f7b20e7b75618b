"""Small HTML pieces of the report: escaped tables, status badges, condition lists, numbers, images."""

from __future__ import annotations

import base64
import html
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from vlmflow.analysis.claims import ClaimResult, Status

_e = html.escape


def _badge(status: Status) -> str:
    css = {Status.HOLDS: "holds", Status.FAILS: "fails", Status.NOT_RUN: "not-run"}[status]
    return f'<span class="badge {css}">{_e(status.value)}</span>'


def _table(header: Sequence[str], rows: Iterable[Sequence[Any]], numeric: Sequence[int] = ()) -> str:
    head = "".join(f"<th>{_e(str(h))}</th>" for h in header)
    body = []
    for row in rows:
        cells = []
        for i, value in enumerate(row):
            text = value if isinstance(value, _Raw) else _e("" if value is None else str(value))
            cells.append(f'<td class="num">{text}</td>' if i in numeric else f"<td>{text}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f'<div class="scroll"><table><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table></div>'


class _Raw(str):
    """HTML that is already escaped."""


def _conditions(result: ClaimResult) -> str:
    if not result.conditions:
        return ""
    items = []
    for text, passed in result.conditions:
        css = "cond-none" if passed is None else f"cond-{str(passed).lower()}"
        items.append(f'<li class="{css}">{_e(text)}</li>')
    return f'<ul class="conditions">{"".join(items)}</ul>'


def _fmt(x: float | None, digits: int = 1) -> str:
    return "–" if x is None else f"{x:+.{digits}f}"


def _pairs(rows: Iterable[Sequence[Any]]) -> str:
    body = "".join(f"<tr><th>{_e(str(k))}</th><td>{_e('' if v is None else str(v))}</td></tr>" for k, v in rows)
    return f"<table><tbody>{body}</tbody></table>"


def _data_uri(path: Path) -> str:
    mime = "image/png" if path.suffix == ".png" else "image/jpeg"
    return f"data:{mime};base64,{base64.b64encode(path.read_bytes()).decode()}"
