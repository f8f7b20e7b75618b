"""``vlmflow organism ...``: train, evaluate and locate the shipped model organism; write scene sets."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import typer

from vlmflow.cli.common import console, progress_bar, setup_logging
from vlmflow.cli.usage import examples

organism_app = typer.Typer(
    help="The model organism: a small LLaVA trained on synthetic shape scenes.",
    no_args_is_help=True,
    epilog=examples("vlmflow organism eval", "vlmflow organism scenes scenes --per-task 20"),
)


@organism_app.command("train")
def train_command(
    out: Path = typer.Option(Path("organism-checkpoint"), "--out", "-o", help="Checkpoint folder to write."),
    planted: bool = typer.Option(False, "--planted", help="Train the planted-route organism (routes known by construction) on top of the shipped organism."),
    seed: int = typer.Option(0, "--seed", help="Seeds weights, scenes and task draws."),
    steps: int | None = typer.Option(None, "--steps", help="Question-stage steps (default: the recipe's)."),
    vision_steps: int | None = typer.Option(None, "--vision-steps", help="Vision-stage steps (default: the recipe's)."),
    minutes: float | None = typer.Option(None, "--minutes", help="Stop the question stage after this many minutes in all."),
    threads: int | None = typer.Option(None, "--threads", help="torch CPU threads (default: the recipe's)."),
    eval_per_task: int | None = typer.Option(None, "--eval-per-task", help="Held-out questions per task type (default: the recipe's)."),
    log_file: Path | None = typer.Option(None, "--log", help="Log file (default: OUT/train.log)."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Also print the log."),
) -> None:
    """Train an organism on CPU with the recorded recipe (from scratch, or with --planted the
    planted-route organism on top of the shipped one); keep the best checkpoint."""
    setup_logging(verbose)
    from dataclasses import replace

    from vlmflow.organism.train import RECIPE_FILE, Recipe, train

    overrides = {"steps": steps, "threads": threads, "eval_per_task": eval_per_task}
    if planted:
        from vlmflow.errors import ConfigError
        from vlmflow.organism.planted import PlantedRecipe, train_planted

        if vision_steps is not None:
            raise ConfigError("--vision-steps does not apply to --planted (the planted organism reuses the shipped vision tower)")
        recipe: Recipe | PlantedRecipe = replace(PlantedRecipe(seed=seed), **{k: v for k, v in overrides.items() if v is not None})
    else:
        overrides["vision_steps"] = vision_steps
        recipe = replace(Recipe(seed=seed), **{k: v for k, v in overrides.items() if v is not None})
    out.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(log_file or out / "train.log", mode="w")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    handler.setLevel(logging.INFO)
    library_log = logging.getLogger("vlmflow")
    previous = (library_log.level, library_log.propagate)
    library_log.addHandler(handler)
    library_log.setLevel(logging.INFO)
    library_log.propagate = verbose  # the progress bar speaks on the console; details go to the log file
    try:
        with progress_bar("steps") as update:
            if isinstance(recipe, Recipe):
                result = train(recipe, out, progress=update, max_minutes=minutes)
            else:
                result = train_planted(recipe, out, progress=update, max_minutes=minutes)
    finally:
        library_log.removeHandler(handler)
        library_log.setLevel(previous[0])
        library_log.propagate = previous[1]
        handler.close()
    _print_table(result.table)
    console.print(f"trained in {result.seconds / 60:.1f} min; checkpoint: [bold]{out}[/] (recipe and table in {RECIPE_FILE})")


@organism_app.command("eval")
def eval_command(
    model: str = typer.Option("organism", "--model", "-m", help="Organism checkpoint folder or alias (default: the shipped organism; 'organism-planted': the planted one)."),
    per_task: int = typer.Option(100, "--per-task", help="Held-out questions per task type."),
    seed: int | None = typer.Option(None, "--seed", help="Seed of the questions (default: the held-out seed)."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Log details."),
) -> None:
    """Accuracy of an organism per task type on held-out scene questions."""
    setup_logging(verbose)
    from vlmflow.loading import load_model
    from vlmflow.organism.encode import BatchEncoder
    from vlmflow.organism.evaluate import HELD_OUT_SEED, evaluate, held_out_questions

    loaded = load_model(model, device="cpu", dtype="float32")
    encoder = BatchEncoder(loaded.processor, loaded.template)
    table = evaluate(loaded.model, encoder, held_out_questions(per_task, HELD_OUT_SEED if seed is None else seed))
    _print_table(table)


@organism_app.command("path")
def path_command(
    planted: bool = typer.Option(False, "--planted", help="The planted-route organism's folder."),
) -> None:
    """Print the folder of the shipped organism checkpoint."""
    from vlmflow.organism import ALIAS, PLANTED_ALIAS, organism_path

    console.print(str(organism_path(PLANTED_ALIAS if planted else ALIAS)), highlight=False)


@organism_app.command("scenes")
def scenes_command(
    out: Path = typer.Argument(..., help="Folder to write the task CSVs and images into."),
    per_task: int = typer.Option(20, "--per-task", "-n", help="Questions per task type (with --video: videos)."),
    seed: int = typer.Option(0, "--seed", help="Scene seed (the same seed gives the same files)."),
    video: bool = typer.Option(
        False, "--video", help="Write videos instead: a shape moves left or right between frames (a frame folder each)."
    ),
    frames: int = typer.Option(4, "--frames", min=2, help="Frames per video (with --video)."),
) -> None:
    """Write synthetic scene questions of all six task types (released GQA layout, PNGs beside), or
    with --video synthetic videos ("Did the circle move to the left or to the right?")."""
    if video:
        from vlmflow.data.scene_video import write_video_set

        console.print(f"video: {write_video_set(out, per_task, seed, frames)}")
        return
    from vlmflow.data.scene_sets import write_scene_set

    for task, path in write_scene_set(out, per_task, seed).items():
        console.print(f"{task.value}: {path}")


def _print_table(table: dict[str, dict]) -> None:
    from rich.table import Table

    view = Table("task", "questions", "correct", "accuracy %")
    for task, row in table.items():
        view.add_row(task, str(row["n"]), str(row["correct"]), f"{row['accuracy']:.1f}")
    console.print(view)
    logging.getLogger(__name__).debug("table %s", json.dumps(table))


#: The examples of each ``vlmflow organism`` subcommand's help page.
EXAMPLES = {
    "train": examples("vlmflow organism train --out my-organism", "vlmflow organism train --out quick --steps 200 --minutes 5"),
    "eval": examples("vlmflow organism eval", "vlmflow organism eval --model my-organism --per-task 50"),
    "path": examples("vlmflow organism path", "ls $(vlmflow organism path)"),
    "scenes": examples("vlmflow organism scenes scenes", "vlmflow organism scenes scenes --per-task 50 --seed 1"),
}


def register(app: typer.Typer) -> None:
    """Add ``organism`` to ``app``, each subcommand with its examples."""
    for info in organism_app.registered_commands:
        info.epilog = info.epilog or EXAMPLES.get(str(info.name))
    app.add_typer(organism_app, name="organism")
