"""dpo export: the trained model as a standalone HF directory + model card; optional Hub push."""

from __future__ import annotations

from pathlib import Path

import click

from pipeline.artifacts import manifest_digest, read_manifest, staged_dir, write_manifest
from pipeline.base import base_source
from pipeline.export import export_model, model_card, push_to_hub, read_metrics

from . import paths
from .common import load, params_option, path_option, user_errors


def run(params: dict, train: Path = paths.TRAIN, normalized: Path = paths.NORMALIZED, base: Path = paths.BASE,
        metrics_path: Path = paths.METRICS, out: Path = paths.EXPORT, api=None) -> dict:
    read_manifest(train, "train")
    cfg = params["export"]
    with staged_dir(out) as tmp:
        kind = export_model(train / "model", tmp, merge_adapter=cfg["merge_adapter"])
        card = model_card(title=cfg["push"]["repo_id"] or "DPO model", base_model=params["model"]["name_or_path"],
                          params=params, metrics=read_metrics(metrics_path), data_digest=manifest_digest(normalized))
        (tmp / "README.md").write_text(card)
        inputs = {"train": manifest_digest(train), "normalized": manifest_digest(normalized), "base": manifest_digest(base)}
        manifest = write_manifest(tmp, "export", inputs=inputs, params=cfg, extra={**kind, "base_source": base_source(base)[0]})
    if cfg["push"]["enabled"]:
        manifest["pushed"] = push_to_hub(out, cfg["push"]["repo_id"], cfg["push"]["private"], api=api)
    return manifest


@click.command("export")
@params_option
@path_option("train", paths.TRAIN, "The trained model artifact.")
@path_option("normalized", paths.NORMALIZED, "The normalized artifact (its digest goes into the model card).")
@path_option("base", paths.BASE, "The base artifact.")
@path_option("metrics", paths.METRICS, "The evaluation metrics for the model card.")
@path_option("out", paths.EXPORT, "Where to write the exported model.")
@user_errors
def command(params_path: Path, train: Path, normalized: Path, base: Path, metrics: Path, out: Path) -> None:
    """Export the trained model (merged if an adapter) with tokenizer and model card; push if export.push.enabled."""
    manifest = run(load(params_path), train, normalized, base, metrics, out)
    click.echo(f"export: -> {out}" + (f", pushed {len(manifest['pushed'])} files" if "pushed" in manifest else ""))
