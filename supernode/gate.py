"""``flwr-clientapp`` behind the site's approvals: a run's code is checked before any of it is imported.

Flower's SuperNode starts one ``flwr-clientapp`` process per task, by name on PATH. The supervisor
puts a shim of that name first on the SuperNode's PATH; the shim runs :func:`main`, which is Flower's
own ``flwr-clientapp`` with three steps of its runtime wrapped (the hooks live in
:mod:`flowerbed.flower.supernode`, each checked when installed):

1. after Flower pulls the message, run and FAB: :func:`flowerbed.supernode.approval.decide`, from the
   FAB's bytes (Flower's own hash) and the run config, before anything is unpacked or imported;
2. a refused FAB is not unpacked;
3. a refused run gets a ClientApp that only replies with the refusal (code 4003) naming the site, the
   hash and the command that approves it; an approved own task is imported from the approved wheel.

Every decision is a ``flowerbed-task:`` line, which the supervisor shows and logs at the site.
Fail closed: every ClientApp call is guarded too (Flower's public ``ClientApp.__call__``), so an app
that another Flower loads by a route around these steps, or a gate whose hooks could not be
installed, answers with the refusal, naming the Flower version.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from flowerbed import flower
from flowerbed.flower import arrays, supernode
from flowerbed.protocol import REFUSED_CODE, SITE_FILE_ENV, site_event

if TYPE_CHECKING:
    from flwr.app import Message

    from flowerbed.supernode.approval import Decision

SHIM = "flwr-clientapp"
REFUSAL_MARK = "_flowerbed_refusal"  # on a ClientApp that only refuses


def refusal_app(reason: str) -> Any:
    """A ClientApp that answers every message with the refusal, and runs nothing else."""
    from flwr import clientapp

    app = clientapp.ClientApp()

    def refuse(msg: Message, _context: Any) -> Message:
        return refusal(msg, reason)

    app.train()(refuse)
    app.evaluate()(refuse)
    app.query()(refuse)
    setattr(app, REFUSAL_MARK, True)
    return app


def refusal(message: Message, reason: str) -> Message:
    """The reply that refuses ``message`` (code 4003, the reason in one line)."""
    from flwr.app import Error
    from flwr.app import Message as FlowerMessage

    return FlowerMessage(Error(code=REFUSED_CODE, reason=reason), reply_to=message)


def _site_file() -> Path | None:
    value = os.environ.get(SITE_FILE_ENV, "")
    return Path(value) if value else None


@dataclass
class Gate:
    """What the gate decided in this task process, and whether its hooks are in place."""

    decided: list[Decision] = field(default_factory=list)
    loaded_through_gate: bool = False
    broken: str = ""  # a hook that could not be installed: every call is refused with this line

    def allowed(self) -> bool:
        """True when the hooks are in place and the gate allowed this task's run."""
        return not self.broken and bool(self.decided) and self.decided[-1].allowed

    def answer(self, app: Any, message: Message, call: Callable[[], Message]) -> Message:
        """The ClientApp call guard: run the app only when the gate allowed its run and loaded it."""
        if getattr(app, REFUSAL_MARK, False):
            return call()
        if self.broken:
            reason = f"refused: {self.broken}"
        elif not self.decided:
            reason = f"refused: the approval gate did not see this run's code with Flower {flower.version()}"
        elif not self.decided[-1].allowed:
            reason = self.decided[-1].reason
        elif not self.loaded_through_gate:
            reason = f"refused: the ClientApp was loaded past the approval gate with Flower {flower.version()}"
        else:
            return call()
        site_event(f"REFUSED a ClientApp call: {reason}")
        return refusal(message, reason)


def main() -> None:
    """Flower's ``flwr-clientapp``, with the approval check between pulling the task and loading its code.

    Fails closed: a hook that cannot be installed (another Flower version) or an app that reaches its
    call without the gate's decision is refused with a line that names the Flower version.
    """
    from flowerbed.artifacts import read_fab_bytes
    from flowerbed.audit import TASK, append_here
    from flowerbed.errors import FlowerbedError
    from flowerbed.supernode.approval import Decision, decide
    from flowerbed.task import allow_wheel
    from flowerbed.warmexec import quick_object_pulls

    gate = Gate()
    supernode.guard_clientapp_calls(gate.answer)  # Flower's public ClientApp class: installed first

    def gated_pull(pull: Callable[..., Any]) -> Callable[..., Any]:
        def run(client: Any) -> Any:
            message, context, run, fab = pull(client)
            site = str(context.node_config.get("site-name", f"node {context.node_id}"))
            try:
                decision = decide(_site_file(), site, read_fab_bytes(fab.content), dict(context.run_config))
            except FlowerbedError as exc:  # an unreadable site.toml or FAB: refused, said why
                decision = Decision(False, f"site {site} refused run {run.run_id}: {exc.message}")
            gate.decided.append(decision)
            append_here(TASK, "approval gate", run_id=run.run_id, fab_sha256=fab.hash_str, allowed=decision.allowed,
                        task_sha256=decision.sha256, reason=decision.reason)  # fmt: skip
            if decision.allowed:
                if decision.wheel is not None:
                    allow_wheel(decision.sha256, decision.wheel)
            else:
                site_event(f"REFUSED run {run.run_id}: {decision.reason}")
            return message, context, run, fab

        return run

    def gated_install(install: Callable[..., Any]) -> Callable[..., Any]:
        def run(content: Any, *args: Any, **kwargs: Any) -> Any:
            if not gate.allowed():
                return None  # a refused FAB is not even unpacked
            return install(content, *args, **kwargs)

        return run

    def gated_loader(loader: Callable[..., Any]) -> Callable[..., Any]:
        def run(*args: Any, **kwargs: Any) -> Any:
            load = loader(*args, **kwargs)

            def gated_load(*load_args: Any) -> Any:
                if not gate.allowed():
                    reason = gate.decided[-1].reason if gate.decided else "refused: the run was not checked"
                    return refusal_app(gate.broken or reason)
                app = load(*load_args)
                gate.loaded_through_gate = True
                return app

            return gated_load

        return run

    try:
        # From the SuperNode on loopback, while it still downloads them: as long as it does. Flower
        # 1.42 hands the task out before its SuperNode has the message's objects; a task that gave
        # up first (500 tries, 100 s at 0.2 s: a link cut for 90 s) left its SuperNode waiting for
        # a reply that never came, dead to every later round. The SuperNode deletes the objects
        # when its own download fails, and a task then ends at once ("could not be found").
        quick_object_pulls(cap_s=0.2, endless=True)
        arrays.inflate_arrays_in_one_copy()  # the task's model, read in one copy
        supernode.install_gate(gated_pull, gated_install, gated_loader)
        run = supernode.clientapp_main()
    except flower.HookError as exc:
        gate.broken = exc.message
        site_event(f"REFUSED every run: {exc.message}")
        raise SystemExit(exc.message) from None
    run()


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
