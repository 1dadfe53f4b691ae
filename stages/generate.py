"""dpo generate: a policy's sampled answers to the train split's prompts → artifacts/samples (Parquet: the prompt's
row_id, the sample index, the answer, the policy's identity). In iterative rounds (`--round`), the policy is the
round's starting policy (its base artifact)."""

from __future__ import annotations

from pathlib import Path

import click

from pipeline.core.distributed import is_main
from pipeline.model.loading import load_base_tokenizer, load_policy, load_trained_policy
from pipeline.run.generation import SAMPLES_SCHEMA, sample_answers, sampling_of, train_prompts, write_samples
from pipeline.store.artifacts import manifest_digest, require_same_input, stage_output

from . import paths
from .common import launches, load, params_option, path_option, round_option, user_errors


def run(
    params: dict,
    base: Path = paths.BASE,
    normalized: Path = paths.NORMALIZED,
    out: Path = paths.SAMPLES,
    train: Path | None = None,
    say=click.echo,
) -> dict:
    """Sample generate.num_samples answers from the policy (the trained model of `train` when given, else the one
    `base` names) to generate.num_prompts train prompts."""
    round_cfg = params.get("round") or {"name": None, "number": 0, "pairs": "generated"}
    used = {"seed": params["seed"], "generate": params["generate"], "round": round_cfg["name"]}
    if round_cfg["pairs"] == "original":
        used["skipped"] = True
    # recorded aside, each checked on its own: the pairs made from these answers are a normalized artifact too, and
    # a trained policy's lineage holds the normalized pairs it was trained on
    aside = {"prompts": ("normalized", normalized)}
    if train is not None:
        aside["trained_policy"] = ("train", Path(train))
    with stage_output("generate", out, {"base": base}, used, aside=aside) as output:
        if train is not None:  # the trained policy must come from this base (its tokenizer, its adapter's base)
            require_same_input(output.manifests["trained_policy"], Path(train), "base", manifest_digest(base), "train")
        policy_id = manifest_digest(train if train is not None else base)
        if round_cfg["pairs"] == "original":  # this round trains on the original pairs: nothing to answer
            table = SAMPLES_SCHEMA.empty_table()
            output.extra["skipped"] = f"round {round_cfg['name']} trains on the original pairs only"
            say(f"generate: {output.extra['skipped']}; no answers written")
        else:
            records = train_prompts(normalized, params["generate"]["num_prompts"], params["seed"])
            tokenizer = load_base_tokenizer(base, params)
            model = (
                load_trained_policy(Path(train) / "model", base, params)
                if train is not None
                else load_policy(base, params, trainable=False)
            )
            model.to(_device())
            table = sample_answers(model, tokenizer, records, sampling_of(params, round_cfg["number"]), policy_id)
        if is_main():
            write_samples(table, output.dir)
        output.rows = {"prompts": len(set(table.column("prompt_id").to_pylist())), "answers": table.num_rows}
        output.extra["policy"] = {"digest": policy_id, "path": str(train if train is not None else base)}
    return output.manifest


def _device():
    from accelerate import PartialState

    return PartialState().device


@click.command("generate")
@params_option
@path_option("base", paths.BASE, "The base artifact: the policy (with --train: the model it was trained from).")
@path_option("normalized", paths.NORMALIZED, "The normalized artifact: its train split's prompts are answered.")
@path_option("out", paths.SAMPLES, "Where to write the answers.")
@click.option(
    "--train", type=click.Path(path_type=Path), default=None, help="A train artifact: answer with its trained model."
)
@round_option
@user_errors
@launches
def command(
    params_path: Path, base: Path, normalized: Path, out: Path, train: Path | None, round_name: str | None
) -> None:
    """Sample answers of a policy to the train split's prompts (generate.* params), seeded, batched and sharded across
    processes: what `dpo judge-pairs` scores and pairs."""
    manifest = run(load(params_path, round_name=round_name), base, normalized, out, train)
    click.echo(f"generate: {manifest['rows']} -> {out}")
