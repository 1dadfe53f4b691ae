"""dpo base: resolve the base model (build + warm-start the built-in one) into artifacts/base."""

from __future__ import annotations

from pathlib import Path

import click

from pipeline.artifacts import staged_dir, write_manifest
from pipeline.base import build_builtin_base, describe_external_base
from pipeline.builtin import BUILTIN_MODEL

from . import paths
from .common import load, params_option, path_option, user_errors


def run(params: dict, out: Path = paths.BASE) -> dict:
    builtin = params["model"]["name_or_path"] == BUILTIN_MODEL
    with staged_dir(out) as tmp:
        info = build_builtin_base(params, tmp) if builtin else describe_external_base(params)
        used = {"seed": params["seed"], "model": params["model"], "eval_fraction": params["data"]["eval_fraction"]}
        return write_manifest(tmp, "base", inputs={}, params=used, extra=info)


@click.command("base")
@params_option
@path_option("out", paths.BASE, "Where to write the base artifact.")
@user_errors
def command(params_path: Path, out: Path) -> None:
    """Resolve the base model: build and warm-start the built-in one, or record a Hub id / local directory."""
    manifest = run(load(params_path), out)
    click.echo(f"base: {manifest['source']} -> {out}")
