"""What every stage command shares: the --params option and user-facing errors without tracebacks."""

from __future__ import annotations

import functools
from pathlib import Path

import click

from pipeline.config.params import load_params, round_params
from pipeline.core.distributed import init_process_group, relaunch
from pipeline.core.errors import PipelineError
from pipeline.core.faults import machine_fault
from pipeline.store.hub import configure_network


def params_option(func):
    return click.option(
        "--params",
        "params_path",
        default="params.yaml",
        show_default=True,
        type=click.Path(dir_okay=False, path_type=Path),
        help="The params file (params.yaml).",
    )(func)


def path_option(name: str, default: Path, help: str):
    return click.option(
        f"--{name}", default=str(default), show_default=True, type=click.Path(path_type=Path), help=help
    )


def user_errors(func):
    """Report PipelineError, and the machine's faults (a full disk, a read-only or forbidden folder:
    `pipeline.core.faults`),
    as a one-line message and exit status 1."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        try:
            return func(*args, **kwargs)
        except PipelineError as err:
            raise click.ClickException(str(err)) from None
        except Exception as err:
            folders = sorted((v for v in kwargs.values() if isinstance(v, Path)), key=lambda v: v != kwargs.get("out"))
            sentence = machine_fault(err, click.get_current_context().info_name, folders)
            if sentence is None:
                raise
            raise click.ClickException(sentence) from None

    return wrapper


def round_option(func):
    return click.option(
        "--round",
        "round_name",
        default=None,
        help="A round of iterate.rounds (rounds/dvc.yaml): its settings over the params file's; default: none.",
    )(func)


def load(params_path: Path, *checks, round_name: str | None = None) -> dict:
    """The checked params, as round `round_name` of iterate.rounds sees them when given (`round_params`), and through
    a stage's own `checks` (e.g. the train section against DPOConfig); every Hub request of the stage is bounded by
    their `hub` section from here on."""
    params = load_params(params_path, functools.partial(round_params, name=round_name), *checks)
    configure_network(params["hub"]["timeout_s"], params["hub"]["tries"])
    return params


def command_argv(ctx: click.Context) -> list[str]:
    """The command line that runs this command again with the values it was given: `<stage> --option value ...`."""
    argv = [ctx.info_name]
    for param in ctx.command.params:
        value = ctx.params.get(param.name)
        if isinstance(param, click.Option) and value is not None:
            argv += [param.opts[0], str(value)]
    return argv


def launches(func):
    """A heavy stage's command: with `distributed.num_processes` x `num_machines` > 1, re-run under the launcher
    (`pipeline.core.distributed`) and exit with its status; inside a launched process, join the process group first."""

    @functools.wraps(func)
    def wrapper(**kwargs):
        ctx = click.get_current_context()
        status = relaunch(load(kwargs["params_path"]), command_argv(ctx))
        if status is None:
            init_process_group()
            return func(**kwargs)
        if status != 0:
            raise click.ClickException(
                f"{ctx.info_name}: a process of the launch failed (exit status {status}); its "
                "error is above. Nothing was published; re-running resumes where it can."
            )

    return wrapper
