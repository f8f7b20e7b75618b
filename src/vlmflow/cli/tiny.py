"""``vlmflow tiny-model``: build a tiny random-weight LLaVA checkpoint (for trying things out and tests)."""

from __future__ import annotations

from pathlib import Path

import typer

from vlmflow.cli.common import console, setup_logging
from vlmflow.cli.usage import examples


def tiny_model(
    path: Path = typer.Argument(..., help="Directory to write the checkpoint to."),
    tokenizer: str = typer.Option("sentencepiece", "--tokenizer", help="sentencepiece, bytelevel or word."),
    layers: int = typer.Option(4, "--layers", help="Decoder layers."),
    hidden: int = typer.Option(64, "--hidden", help="Decoder width."),
    image_size: int = typer.Option(32, "--image-size", help="Side of the square view the vision tower sees."),
    patch_size: int = typer.Option(8, "--patch-size", help="Vision patch size ((image/patch)^2 image tokens)."),
    seed: int = typer.Option(0, "--seed", help="Weight initialisation seed."),
) -> None:
    """Build a tiny random LLaVA (CLIP + Llama) with an offline tokenizer and save it with save_pretrained."""
    setup_logging(False)
    from vlmflow.tiny.llava import TinyLlavaConfig, build_tiny_llava

    if tokenizer not in ("sentencepiece", "bytelevel", "word"):
        raise typer.BadParameter(f"unknown tokenizer {tokenizer!r}; valid: sentencepiece, bytelevel, word")
    config = TinyLlavaConfig(
        tokenizer=tokenizer,  # type: ignore[arg-type]
        layers=layers,
        hidden=hidden,
        image_size=image_size,
        patch_size=patch_size,
        seed=seed,
    )
    model, _ = build_tiny_llava(config, path)
    n_params = sum(p.numel() for p in model.parameters())
    console.print(f"tiny LLaVA ({n_params / 1e6:.2f} M parameters, {layers} layers) written to [bold]{path}[/]")


def register(app: typer.Typer) -> None:
    """Add ``tiny-model`` to ``app``."""
    app.command(
        "tiny-model",
        epilog=examples(
            "vlmflow tiny-model tiny-llava",
            "vlmflow tiny-model tiny-llava && vlmflow flows -m tiny-llava -d my_task.csv --images my_images --keep-all",
        ),
    )(tiny_model)
