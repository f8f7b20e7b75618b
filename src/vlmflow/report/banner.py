"""The banner above the report's claims checklist: what each model is, and what it is and is not
expected to show (known for the shipped organisms and for any checkpoint with planted routes).

>>> expectations_banner([("llava", "llava-hf/llava-1.5-7b-hf")])
''
"""

from __future__ import annotations

import html
from collections.abc import Sequence

from vlmflow.organism.expectations import expectation_for


def expectations_banner(models: Sequence[tuple[str, str | None]]) -> str:
    """HTML for ``(label, model name)`` pairs; empty when no model's expectations are known."""
    items = []
    for label, name in models:
        known = expectation_for(name) if name else None
        if known is not None:
            e = html.escape
            items.append(
                f'<li data-model="{e(label)}"><b>{e(label)}</b>: {e(known.what)}. <b>Expected</b>: {e(known.expected)}. '
                f"<b>Not expected</b>: {e(known.not_expected)}.</li>"
            )
    if not items:
        return ""
    return f'<div class="banner" data-banner="expectations"><b>What these models are expected to show</b><ul>{"".join(items)}</ul></div>'
