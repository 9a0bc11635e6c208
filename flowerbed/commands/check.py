"""``flowerbed check``: the same checks a bare VM runs before anything is installed."""

from __future__ import annotations

import typer

from flowerbed.deploy import firewall_checklist

app = typer.Typer(help="Check a site VM before installing: firewall allowlist, TLS, clock.", no_args_is_help=True)


@app.command(
    "firewall",
    help="Run the firewall allowlist checklist (deploy/firewall_checklist.py); --help lists its options.",
    context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
    add_help_option=False,
)
def firewall(ctx: typer.Context) -> None:
    code = firewall_checklist.main(list(ctx.args), prog="flowerbed check firewall")
    raise typer.Exit(code)
