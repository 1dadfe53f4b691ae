"""The `dpo` command: one subcommand per pipeline stage."""

from __future__ import annotations

import click

from . import base, evaluate, export, normalize, ref_logps, tokenize, train


@click.group()
@click.version_option(package_name="dpo-pipeline")
def main() -> None:
    """Staged DPO training: base → normalize → tokenize → ref-logps → train → evaluate → export.

    Each stage reads params.yaml and the artifacts of the stages before it under artifacts/;
    `dvc repro` runs them in order and re-runs only what a change invalidates.
    """


for module in (base, normalize, tokenize, ref_logps, train, evaluate, export):
    main.add_command(module.command)

if __name__ == "__main__":
    main()
