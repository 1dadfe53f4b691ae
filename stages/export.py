"""dpo export: the trained model as a standalone HF directory + model card; optional Hub push."""

from __future__ import annotations

from pathlib import Path

import click

from pipeline.config.train_params import check_train
from pipeline.core.faults import require_free_space
from pipeline.model.loading import load_base_model
from pipeline.publish.export import data_digests, export_model, model_card, push_to_hub
from pipeline.publish.metrics_file import read_metrics
from pipeline.store.artifacts import stage_output
from pipeline.store.base_record import base_source, source_kind

from . import paths
from .common import load, params_option, path_option, user_errors


def run(
    params: dict,
    train: Path = paths.TRAIN,
    normalized: Path = paths.NORMALIZED,
    base: Path = paths.BASE,
    metrics_path: Path = paths.METRICS,
    out: Path = paths.EXPORT,
    api=None,
) -> dict:
    cfg = params["export"]
    source, revision = base_source(base)
    if Path(source).is_dir():
        source = str(Path(source).resolve())
    # at least the trained model's files again (a merged adapter adds the base's): refused up front when they cannot fit
    require_free_space(
        out, sum(f.stat().st_size for f in (train / "model").rglob("*") if f.is_file()), "the exported model"
    )
    with stage_output("export", out, {"train": train, "normalized": normalized, "base": base}, cfg) as output:
        # an adapter is merged into the full-precision base (not a 4-bit one), as the base stage resolved it
        kind = export_model(
            train / "model",
            output.dir,
            merge_adapter=cfg["merge_adapter"],
            load_base=lambda: load_base_model(base, params, quantized=False),
            base_name=source,
            base_revision=revision,
        )
        card = model_card(
            title=cfg["push"]["repo_id"] or "DPO model",
            base_model=params["model"]["name_or_path"],
            base_kind=source_kind(output.manifests["base"]),
            base_revision=revision,
            params=params,
            metrics=read_metrics(metrics_path),
            data_digests=data_digests(normalized, output.manifests["normalized"]),
            adapter=kind["adapter"] or None,
            merged=kind["merged"],
        )
        (output.dir / "README.md").write_text(card)
        output.extra = {"adapter": bool(kind["adapter"]), "merged": kind["merged"], "base_source": source}
    manifest = output.manifest
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
    manifest = run(load(params_path, check_train), train, normalized, base, metrics, out)
    click.echo(f"export: -> {out}" + (f", pushed {len(manifest['pushed'])} files" if "pushed" in manifest else ""))
