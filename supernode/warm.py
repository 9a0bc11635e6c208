"""The site's warm ClientApp executor: ``flower-superexec`` whose tasks are forks of one warm process.

Started by the supervisor next to ``flower-supernode --isolation process`` (see
:mod:`flowerbed.warmexec`). Up front it imports torch, flwr's ClientApp runtime, the kit's ClientApp
and every task wheel the site has approved; each task is a fork that runs the approval gate
(:mod:`flowerbed.supernode.gate`) exactly as a separate ``flwr-clientapp`` process would: the run's
code is checked before any of it is used, and an unapproved or changed wheel is refused.

``FLOWERBED_TORCH_THREADS`` (:data:`flowerbed.warmexec.THREADS_ENV`): torch's thread count in each
task; the supervisor sets it, and OpenMP's variables, in the executor's environment.
"""

from __future__ import annotations

import os
from pathlib import Path

from flowerbed.protocol import site_event


def preload() -> None:
    """Import what every task imports, and warm torch up; no thread (it would not survive a fork).

    Opacus (DP-SGD; 1.5 s of CPU to import) up front only at a site with its own privacy budget, whose
    every task trains with it; elsewhere the executor imports it once a run's task needed it
    (:data:`flowerbed.warmexec.LEARNED`)."""
    import torch  # noqa: F401

    import flowerbed.clientapp.app  # the kit's ClientApp and its built-in tasks
    import flowerbed.supernode.gate  # noqa: F401
    from flowerbed.flower import supernode
    from flowerbed.warmexec import DP_SITE_ENV, task_threads, warm_up_torch

    supernode.preload_clientapp_runtime()
    warm_up_torch()
    tasks = _preload_approved()
    dp = os.environ.get(DP_SITE_ENV) == "1"
    if dp:
        import opacus  # noqa: F401
    check_no_cuda()
    site_event(
        f"warm ClientApp executor ready (pid {os.getpid()}): torch, {'opacus, ' if dp else ''}flwr and {tasks} "
        f"approved task(s) imported once, {task_threads()} torch thread(s) per task"
    )


def check_no_cuda() -> None:
    """Fail closed if anything imported so far made a CUDA context: the forked tasks could not use the GPU.

    The kit never asks torch about the GPU here (:mod:`flowerbed.clientapp.device`); an approved task
    wheel that does so at import is named by the error.
    """
    import torch

    if torch.cuda.is_initialized():  # type: ignore[no-untyped-call]
        from flowerbed.errors import FlowerbedError

        raise FlowerbedError(
            "warm executor: CUDA was initialized while the tasks were imported (an approved task touches the GPU "
            'at import?); forked tasks could not use it: set executor = "subprocess" in site.toml, or make the '
            "task touch the GPU only when it trains"
        )


def _preload_approved() -> int:
    """Import each task wheel in the site's approvals (a task of another hash is still imported per run)."""
    from flowerbed.errors import FlowerbedError
    from flowerbed.protocol import SITE_FILE_ENV
    from flowerbed.supernode.approval import load_site
    from flowerbed.task import preload_wheel_task

    site_file = os.environ.get(SITE_FILE_ENV, "")
    if not site_file:
        return 0
    root = Path(site_file).parent
    try:
        approved = load_site(root).approved
    except FlowerbedError:
        return 0  # each task's gate reports an unreadable site.toml
    loaded = 0
    for entry in approved:
        if entry.kind != "task" or not entry.file:
            continue
        try:
            preload_wheel_task(root / entry.file, entry.name, entry.sha256)
            loaded += 1
        except FlowerbedError as exc:  # changed or broken: the gate refuses it when a run asks for it
            site_event(f"warm executor: approved task {entry.name} not preloaded: {exc.message}")
    return loaded


def main() -> None:
    """Each task: Flower's flwr-clientapp behind the approval gate (:func:`flowerbed.supernode.gate.main`)."""
    from flowerbed.supernode.gate import main as gated_clientapp
    from flowerbed.warmexec import serve

    serve({"flwr-clientapp": gated_clientapp}, preload)


if __name__ == "__main__":
    main()
