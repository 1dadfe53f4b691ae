"""dpo base: resolve the base model (build + warm-start the built-in one) into artifacts/base."""

from __future__ import annotations

from pathlib import Path

import click

from pipeline.builtin import BUILTIN_MODEL, BUILTIN_VLM
from pipeline.core.errors import PipelineError
from pipeline.run.warm_start import build_builtin_base
from pipeline.store.artifacts import read_json, stage_output
from pipeline.store.base_record import describe_external_base, describe_reference_and_adapter, round_base_record

from . import paths
from .common import load, params_option, path_option, round_option, user_errors

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


def run_round(params: dict, previous: Path, initial: Path, out: Path) -> dict:
    """The base artifact of round params["round"]: the policy it starts from, `previous` (the train artifact of the
    round before, or the initial base artifact for the first round), and its reference (iterate.reference)."""
    name, reference = params["round"]["name"], params["iterate"]["reference"]
    if params["model"]["adapter"]:
        raise PipelineError(
            f"round {name}: model.adapter (continue an adapter of your own) is not supported in iterative rounds; "
            "merge it into the model first, or start the rounds from the base with model.peft.enabled: true."
        )
    lora = params["model"]["peft"]["enabled"]
    if lora and reference == "initial" and not params["train"].get("precompute_ref_log_probs"):
        raise PipelineError(
            f"round {name}: a LoRA round whose reference is the initial model scores that reference in the "
            "ref-logps stage (the base with the adapter off); set train.precompute_ref_log_probs: true."
        )
    if not (Path(previous) / "manifest.json").is_file():
        raise PipelineError(
            f"{previous}: no manifest.json, so the round before round {name} has not finished; run it first "
            "(`cd rounds && dvc repro` runs the rounds in order)."
        )
    manifest = read_json(Path(previous) / "manifest.json", f"the artifact of the round before {name}", "re-run it")
    kind = "base" if manifest.get("stage") == "base" else "train"  # checked as that kind below, with its lineage
    aside = {"previous": (kind, Path(previous)), "initial": ("base", Path(initial))}
    with stage_output("base", out, {}, {"round": name, "reference": reference}, aside=aside) as output:
        output.extra = round_base_record(name, previous, manifest, initial, reference)
    return output.manifest


@click.command("base")
@params_option
@path_option("out", paths.BASE, "Where to write the base artifact.")
@round_option
@click.option(
    "--previous",
    type=click.Path(path_type=Path),
    default=None,
    help="With --round: the artifact of the round before (its train artifact; the initial base for the first).",
)
@click.option(
    "--initial", type=click.Path(path_type=Path), default=None, help="With --round: the initial base artifact."
)
@user_errors
def command(params_path: Path, out: Path, round_name: str | None, previous: Path | None, initial: Path | None) -> None:
    """Resolve the base model (build and warm-start the built-in one, or record a Hub id / local directory),
    and record the explicit reference model and the adapter to continue, when params name them. With --round: the
    base of an iterative round, naming the policy it starts from (--previous) and its reference."""
    if round_name is not None:
        if previous is None or initial is None:
            raise click.UsageError("--round needs --previous and --initial.")
        manifest = run_round(load(params_path, round_name=round_name), previous, initial, out)
        click.echo(f"base: round {round_name} starts from {manifest['source']} -> {out}")
        return
    manifest = run(load(params_path), out)
    click.echo(f"base: {manifest['source']} -> {out}")
