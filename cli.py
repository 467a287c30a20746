"""The `reglue` command line: a thin typer layer. Each command builds a config dataclass and calls
one function in `pipeline/` or `trainer/`."""

from __future__ import annotations

import typer

app = typer.Typer(no_args_is_help=True, add_completion=False, help=__doc__)
cache_app = typer.Typer(no_args_is_help=True, help="Inspect and check a feature cache.")
app.add_typer(cache_app, name="cache")


# ---- extract / cache (pipeline) -------------------------------------------------------------


# ---- models (trainer.models) ----------------------------------------------------------------


# ---- train-compressor / train (trainer.loop) ------------------------------------------------


# ---- sample / fid (trainer.sampling, trainer.metrics) ---------------------------------------


# ---- demo -----------------------------------------------------------------------------------


def main() -> None:
    app()


if __name__ == "__main__":
    main()
