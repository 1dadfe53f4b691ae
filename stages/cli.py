"""The `dpo` command: one subcommand per pipeline stage, `dpo compare` (runs side by side) and `dpo sweep`
(configurations trained side by side in chunks); the last two are not stages.

Each subcommand's module is imported only when that subcommand runs, so `dpo train` executes the
files `dvc.yaml` lists for the train stage and nothing of the other stages.
"""

from __future__ import annotations

import importlib

import click

from pipeline.store.stage_list import ROUND_STAGES, STAGES

# subcommand -> module under stages/, in pipeline order
STAGE_MODULES = {stage.name: stage.module for stage in STAGES + ROUND_STAGES}
# commands that are not pipeline stages (dvc.yaml runs none of them)
TOOL_MODULES = {"compare": "compare", "sweep": "sweep"}


class StageGroup(click.Group):
    """A click group that imports a stage's module when the stage is asked for."""

    def list_commands(self, ctx) -> list[str]:
        return [*STAGE_MODULES, *TOOL_MODULES]

    def get_command(self, ctx, name: str):
        module = STAGE_MODULES.get(name) or TOOL_MODULES.get(name)
        if module is None:
            return None
        return importlib.import_module(f"stages.{module}").command


@click.group(cls=StageGroup)
@click.version_option(package_name="dpo-pipeline")
def main() -> None:
    """Staged DPO training: base → normalize → tokenize → ref-logps → train → evaluate → export.

    Each stage reads params.yaml and the artifacts of the stages before it under artifacts/;
    `dvc repro` runs them in order and re-runs only what a change invalidates; `dpo compare` puts runs side by side.
    """


if __name__ == "__main__":  # `python -m stages.cli <stage>`, as dvc.yaml runs it
    main(prog_name="dpo")
