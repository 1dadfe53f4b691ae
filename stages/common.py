"""What every stage command shares: the --params option and user-facing errors without tracebacks."""

from __future__ import annotations

import functools
from pathlib import Path

import click

from pipeline.errors import PipelineError
from pipeline.params import load_params


def params_option(func):
    return click.option("--params", "params_path", default="params.yaml", show_default=True,
                        type=click.Path(dir_okay=False, path_type=Path), help="The params file (params.yaml).")(func)


def path_option(name: str, default: Path, help: str):
    return click.option(f"--{name}", default=str(default), show_default=True, type=click.Path(path_type=Path), help=help)


def user_errors(func):
    """Report PipelineError as a one-line message and exit status 1."""
    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        try:
            return func(*args, **kwargs)
        except PipelineError as err:
            raise click.ClickException(str(err)) from None
    return wrapper


def load(params_path: Path) -> dict:
    return load_params(params_path)
