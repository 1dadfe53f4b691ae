"""dpo base: resolve the base model (build + warm-start the built-in one) into artifacts/base."""

from __future__ import annotations

from pathlib import Path

import click

from pipeline.builtin import BUILTIN_MODEL, BUILTIN_VLM
from pipeline.run.warm_start import build_builtin_base
from pipeline.store.artifacts import stage_output
from pipeline.store.base_record import describe_external_base, describe_reference_and_adapter

from . import paths
from .common import load, params_option, path_option, user_errors

# The model.* keys that decide what the base artifact holds (the dvc.yaml base stage lists the same);
# loading options (dtype, attention, quantization, LoRA) are read by the stages that load models.
BASE_MODEL_KEYS = ("name_or_path", "revision", "ref_name_or_path", "ref_revision", "adapter", "builtin")


def run(params: dict, out: Path = paths.BASE) -> dict:
    used = {
        "seed": params["seed"],
        "eval_fraction": params["data"]["eval_fraction"],
        "model": {k: params["model"][k] for k in BASE_MODEL_KEYS},
    }
    with stage_output("base", out, {}, used) as output:
        name = params["model"]["name_or_path"]
        if name == BUILTIN_MODEL:
            output.extra = build_builtin_base(params, output.dir)
        elif name == BUILTIN_VLM:
            from pipeline.run.warm_start_vision import build_builtin_vision_base

            output.extra = build_builtin_vision_base(params, output.dir)
        else:
            output.extra = describe_external_base(params)
        output.extra.update(describe_reference_and_adapter(params))
    return output.manifest


@click.command("base")
@params_option
@path_option("out", paths.BASE, "Where to write the base artifact.")
@user_errors
def command(params_path: Path, out: Path) -> None:
    """Resolve the base model (build and warm-start the built-in one, or record a Hub id / local directory),
    and record the explicit reference model and the adapter to continue, when params name them."""
    manifest = run(load(params_path), out)
    click.echo(f"base: {manifest['source']} -> {out}")
