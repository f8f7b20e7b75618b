"""``vlmflow models``: the supported model families, what each supports and how it was verified."""

from __future__ import annotations

import json

import typer

from vlmflow.cli.common import console
from vlmflow.cli.usage import examples

#: Aspects shown per family, in this order (keys of :attr:`ModelFamily.support <vlmflow.adapters.family.ModelFamily.support>`).
ASPECTS = ("prompt", "groups", "box mapping", "attention", "fast engine", "verified")


def inputs_line(several_images: bool, video: bool) -> str:
    """What a prompt of the family may show, in words.

    >>> inputs_line(True, True)
    'one or several images; video (frames)'
    """
    return ("one or several images" if several_images else "one image") + ("; video (frames)" if video else "")


def family_table() -> list[dict[str, object]]:
    """One row per registered family: name, architectures, default template, support, refusal reason.

    >>> next(r for r in family_table() if r["family"] == "llava")["default_template"]
    'vicuna_v1'
    """
    from vlmflow.adapters.registry import families

    rows = []
    for name, cls in sorted(families().items()):
        refused = str(getattr(cls, "refused", "") or "")
        rows.append(
            {
                "family": name,
                "architectures": list(cls.architectures),
                "default_template": cls.default_template or None,
                "description": cls.description,
                "supported": not refused,
                "refused_because": refused or None,
                "several_images": bool(cls.several_images) and not refused,
                "video": bool(cls.video) and not refused,
                **{aspect: dict(cls.support).get(aspect) for aspect in ASPECTS},
            }
        )
    return rows


def models(
    as_json: bool = typer.Option(False, "--json", help="Print the table as JSON."),
) -> None:
    """List the model families vlmflow supports (and refuses), what each supports and how it was verified."""
    rows = family_table()
    if as_json:
        console.print_json(json.dumps(rows))
        return
    for row in rows:
        if not row["supported"]:
            continue
        console.print(f"[bold]{row['family']}[/] ({', '.join(row['architectures'])}) - {row['description']}")
        console.print(f"  default template: {row['default_template']}", highlight=False)
        console.print(f"  inputs: {inputs_line(bool(row['several_images']), bool(row['video']))}", highlight=False)
        for aspect in ASPECTS:
            console.print(f"  {aspect}: {row.get(aspect) or 'not recorded'}", highlight=False)
    refused = [row for row in rows if not row["supported"]]
    if refused:
        console.print("[bold]refused[/] (loading one fails with this reason):")
        for row in refused:
            console.print(f"  {row['family']} ({', '.join(row['architectures'])}): {row['refused_because']}")


def register(app: typer.Typer) -> None:
    """Add ``models`` to ``app``."""
    app.command("models", epilog=examples("vlmflow models", "vlmflow models --json"))(models)
