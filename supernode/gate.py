"""``flwr-clientapp`` behind the site's approvals: a run's code is checked before any of it is imported.

Flower's SuperNode starts one ``flwr-clientapp`` process per task, by name on PATH. The supervisor
puts a shim of that name first on the SuperNode's PATH; the shim runs :func:`main`, which is Flower's
own ``flwr-clientapp`` with three steps of its runtime wrapped (flwr 1.42, pinned):

1. after Flower pulls the message, run and FAB: :func:`flowerbed.supernode.approval.decide`, from the
   FAB's bytes (Flower's own hash) and the run config, before anything is unpacked or imported;
2. a refused FAB is not unpacked;
3. a refused run gets a ClientApp that only replies with the refusal (code 4003) naming the site, the
   hash and the command that approves it; an approved own task is imported from the approved wheel.

Every decision is a ``flowerbed-task:`` line, which the supervisor shows and logs at the site.
"""

from __future__ import annotations

import importlib
import os
import sys
from pathlib import Path
from typing import Any

SITE_FILE_ENV = "FLOWERBED_SITE_FILE"  # the kit's site.toml; empty: no kit, built-in tasks only
SHIM = "flwr-clientapp"


def refusal_app(reason: str) -> Any:
    """A ClientApp that answers every message with the refusal, and runs nothing else."""
    from flwr.app import Error, Message
    from flwr.clientapp import ClientApp

    from flowerbed.supernode.approval import REFUSED_CODE

    app = ClientApp()

    def refuse(msg: Message, _context: Any) -> Message:
        return Message(Error(code=REFUSED_CODE, reason=reason), reply_to=msg)

    app.train()(refuse)
    app.evaluate()(refuse)
    app.query()(refuse)
    return app


def _site_file() -> Path | None:
    value = os.environ.get(SITE_FILE_ENV, "")
    return Path(value) if value else None


def main() -> None:
    """Flower's ``flwr-clientapp``, with the approval check between pulling the task and loading its code."""
    from flwr.supernode.cli.flwr_clientapp import flwr_clientapp

    runtime: Any = importlib.import_module("flwr.supernode.runtime.run_clientapp")

    from flowerbed.artifacts import read_fab_bytes
    from flowerbed.audit import TASK, append_here
    from flowerbed.errors import FlowerbedError
    from flowerbed.supernode.approval import Decision, decide
    from flowerbed.supernode.events import site_event
    from flowerbed.task import allow_wheel
    from flowerbed.warmexec import quick_object_pulls

    quick_object_pulls(cap_s=0.2)  # from the SuperNode on loopback, while it still downloads them

    decided: list[Decision] = []
    pull, install, loader = runtime.pull_task_input, runtime.install_from_fab, runtime.get_load_client_app_fn

    def gated_pull(client: Any) -> Any:
        message, context, run, fab = pull(client)
        site = str(context.node_config.get("site-name", f"node {context.node_id}"))
        try:
            decision = decide(_site_file(), site, read_fab_bytes(fab.content), dict(context.run_config))
        except FlowerbedError as exc:  # an unreadable site.toml or FAB: refused, said why
            decision = Decision(False, f"site {site} refused run {run.run_id}: {exc.message}")
        decided.append(decision)
        append_here(TASK, "approval gate", run_id=run.run_id, fab_sha256=fab.hash_str, allowed=decision.allowed,
                    task_sha256=decision.sha256, reason=decision.reason)  # fmt: skip
        if decision.allowed:
            if decision.wheel is not None:
                allow_wheel(decision.sha256, decision.wheel)
        else:
            site_event(f"REFUSED run {run.run_id}: {decision.reason}")
        return message, context, run, fab

    def gated_install(content: Any, *args: Any, **kwargs: Any) -> Any:
        if not (decided and decided[-1].allowed):
            return None  # a refused FAB is not even unpacked
        return install(content, *args, **kwargs)

    def gated_loader(*args: Any, **kwargs: Any) -> Any:
        load = loader(*args, **kwargs)

        def gated_load(*load_args: Any) -> Any:
            if not (decided and decided[-1].allowed):
                return refusal_app(decided[-1].reason if decided else "refused: the run was not checked")
            return load(*load_args)

        return gated_load

    runtime.pull_task_input = gated_pull
    runtime.install_from_fab = gated_install
    runtime.get_load_client_app_fn = gated_loader
    flwr_clientapp()


def write_shim(folder: Path) -> Path:
    """The ``flwr-clientapp`` that runs :func:`main` in this environment, for the front of the SuperNode's PATH."""
    folder.mkdir(parents=True, exist_ok=True)
    if os.name == "nt":  # a console-script .exe, as pip makes them
        from pip._vendor.distlib.scripts import ScriptMaker

        maker: Any = ScriptMaker(None, str(folder))  # type: ignore[no-untyped-call]
        maker.executable = sys.executable
        maker.variants = {""}
        maker.make(f"{SHIM} = flowerbed.supernode.gate:main")
        return folder / f"{SHIM}.exe"
    path = folder / SHIM
    path.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m flowerbed.supernode.gate "$@"\n', encoding="utf-8")
    path.chmod(0o755)
    return path


if __name__ == "__main__":
    main()
