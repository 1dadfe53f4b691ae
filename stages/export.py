"""dpo export: the trained model as a standalone HF directory + model card; optional Hub push."""

from __future__ import annotations

from pathlib import Path

import click

from pipeline.artifacts import manifest_digest, read_manifest, staged_dir, write_manifest
from pipeline.base import base_source, load_base_model
from pipeline.export import export_model, model_card, push_to_hub, read_metrics

from . import paths
from .common import load, params_option, path_option, user_errors


def data_digests(normalized: Path) -> dict[str, str]:
    """The normalized data's identity for the model card: its manifest digest and each split file's digest."""
    files = read_manifest(normalized, "normalized")["files"]
    return {"normalized/manifest.json": manifest_digest(normalized),
            **{f"normalized/{name}": digest for name, digest in files.items() if name.endswith(".parquet")}}


def run(params: dict, train: Path = paths.TRAIN, normalized: Path = paths.NORMALIZED, base: Path = paths.BASE,
        metrics_path: Path = paths.METRICS, out: Path = paths.EXPORT, api=None) -> dict:
    read_manifest(train, "train")
    cfg = params["export"]
    source, revision = base_source(base)
    if Path(source).is_dir():
        source = str(Path(source).resolve())
    with staged_dir(out) as tmp:
        # an adapter is merged into the full-precision base (not a 4-bit one), as the base stage resolved it
        kind = export_model(train / "model", tmp, merge_adapter=cfg["merge_adapter"],
                            load_base=lambda: load_base_model(base, params, quantized=False),
                            base_name=source, base_revision=revision)
        card = model_card(title=cfg["push"]["repo_id"] or "DPO model", base_model=params["model"]["name_or_path"],
                          base_revision=revision, params=params, metrics=read_metrics(metrics_path),
                          data_digests=data_digests(normalized), adapter=kind["adapter"] or None, merged=kind["merged"])
        (tmp / "README.md").write_text(card)
        inputs = {"train": manifest_digest(train), "normalized": manifest_digest(normalized), "base": manifest_digest(base)}
        manifest = write_manifest(tmp, "export", inputs=inputs, params=cfg,
                                  extra={"adapter": bool(kind["adapter"]), "merged": kind["merged"], "base_source": source})
    if cfg["push"]["enabled"]:  # after the local export is in place: a failed push leaves it intact
        manifest["pushed"] = push_to_hub(out, cfg["push"]["repo_id"], cfg["push"]["private"], api=api)
    return manifest


@click.command("export")
@params_option
@path_option("train", paths.TRAIN, "The trained model artifact.")
@path_option("normalized", paths.NORMALIZED, "The normalized artifact (its digests go into the model card).")
@path_option("base", paths.BASE, "The base artifact (an adapter is merged into this base).")
@path_option("metrics", paths.METRICS, "The evaluation metrics for the model card.")
@path_option("out", paths.EXPORT, "Where to write the exported model.")
@user_errors
def command(params_path: Path, train: Path, normalized: Path, base: Path, metrics: Path, out: Path) -> None:
    """Export the trained model (for an adapter: the adapter and, by default, the merged model) with tokenizer and
    model card; push to export.push.repo_id if export.push.enabled (token from HF_TOKEN)."""
    manifest = run(load(params_path), train, normalized, base, metrics, out)
    click.echo(f"export: -> {out}" + (f", pushed {len(manifest['pushed'])} files" if "pushed" in manifest else ""))
