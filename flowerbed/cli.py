"""The ``flowerbed`` command: wires the command groups together and renders errors once."""

from __future__ import annotations

import sys
from typing import Annotated

import click
import typer
from pydantic import ValidationError

from flowerbed import __version__
from flowerbed.commands import app as appcmd
from flowerbed.commands import (
    audit,
    bundle,
    certs,
    check,
    demo,
    env,
    init,
    kit,
    report,
    run,
    runs,
    sites,
    superlink,
    supernode,
    task,
)
from flowerbed.config import ConfigError, format_validation_error
from flowerbed.console import error
from flowerbed.errors import ExitCode, FlowerbedError
from flowerbed.filemodes import private_umask

app = typer.Typer(
    name="flowerbed",
    help="Deploy a Flower federation across locked-down workspace VMs: PKI, gateway, SuperLink, "
    "SuperNodes, runs until convergence.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"flowerbed {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    """Deploy a Flower federation across locked-down workspace VMs."""


app.command("init", help=init.HELP)(init.init)
app.command("run", help=run.HELP)(run.run)
app.command("demo", help=demo.HELP)(demo.demo)
app.command("report", help=report.HELP)(report.report)
app.add_typer(audit.app, name="audit")
app.add_typer(certs.app, name="certs")
app.add_typer(check.app, name="check")
app.add_typer(env.app, name="env")
app.add_typer(kit.app, name="kit")
app.add_typer(bundle.app, name="bundle")
app.add_typer(superlink.app, name="superlink")
app.add_typer(supernode.app, name="supernode")
app.add_typer(sites.app, name="sites")
app.add_typer(runs.app, name="runs")
app.add_typer(task.app, name="task")
app.add_typer(appcmd.app, name="app")


def main() -> None:
    """Entry point: every known error is one line (plus field bullets), never a traceback."""
    private_umask()  # keys, kits, models, databases and trails: the owner's alone, in this process and its children
    try:
        code = app(prog_name="flowerbed", standalone_mode=False)
        if isinstance(code, int) and code:
            sys.exit(code)
    except ConfigError as exc:
        error(exc.message, exc.details)
        sys.exit(exc.exit_code)
    except FlowerbedError as exc:
        error(exc.message, exc.details)
        sys.exit(exc.exit_code)
    except ValidationError as exc:
        lines = format_validation_error("options", exc)
        error("invalid settings", lines)
        sys.exit(ExitCode.INVALID_CONFIG)
    except KeyboardInterrupt:
        error("interrupted")
        sys.exit(ExitCode.INTERRUPTED)
    except typer.Abort:
        error("aborted")
        sys.exit(ExitCode.INTERRUPTED)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except click.UsageError as exc:
        where = exc.ctx.command_path if exc.ctx is not None else "flowerbed"
        error(f"{exc.format_message().rstrip('.')} (see `{where} --help`)")
        sys.exit(ExitCode.INVALID_CONFIG)
    except Exception as exc:  # noqa: BLE001 - other click errors and the unexpected
        if isinstance(exc, click.ClickException):
            exc.show()
            sys.exit(exc.exit_code)
        error(f"unexpected {type(exc).__name__}: {exc} (please report this with the command you ran)")
        sys.exit(ExitCode.ERROR)
