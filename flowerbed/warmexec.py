"""A warm executor for Flower's SuperExec: each task runs in a fork of one process that imported once.

Flower's ``flower-superexec`` starts a new ``flwr-clientapp`` (or ``flwr-serverapp``) process for
every task: a fresh interpreter that imports torch and flwr again, seconds of every round. This
module runs Flower's own ``flower-superexec`` main loop (its flags, its Runtime API client, its
SuperExec authentication) with one change: the executor that launches a task forks this process,
which imported torch, flwr's runtime and the kit's apps (and a site's approved tasks) up front, and
the child runs the very command the subprocess executor would have started, with the same
arguments (``flwr-clientapp --runtime-api-address ... --token ...``). A task that crashes takes
only its child down.

The Flower internals it relies on (``run_superexec.get_executor``, the ``Executor`` protocol,
``LaunchResult``) are reached through :mod:`flowerbed.flower.superexec`, checked when installed;
the tests run real tasks through it. Without ``os.fork`` (Windows) :func:`can_fork` is False and the kit
starts Flower's own ``flower-superexec`` instead.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import signal
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from flowerbed.errors import FlowerbedError
from flowerbed.flower import HookError, superexec
from flowerbed.protocol import TASK_EVENT

POLL_ENV = "FLWR_SUPEREXEC_TASK_POLL_INTERVAL"  # Flower's own setting (seconds, default 1.0)
THREADS_ENV = "FLOWERBED_TORCH_THREADS"  # torch threads per task (default: this machine's cores)
THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")  # what torch's OpenMP runtime reads at import
POLL_S = "0.1"  # how often the executor asks the Runtime API for a task right after one started or ended
IDLE_POLL_S = 1.0  # ... slowing down to this (Flower's default) over RAMP_S: an idle site or coordinator
RAMP_S = 20.0  # polling ten times a second used 2.5x the CPU (3 sites: 0.32 -> 0.13 cores); so did a
# ServerApp executor polling ten times a second for as long as a run went on (its task)
Runner = Callable[[], None]  # a command's main function; it reads sys.argv
TASK_STARTED, TASK_ENDED = "warm executor: task started", "warm executor: task ended"  # read by the supervisor
DP_SITE_ENV = "FLOWERBED_DP_SITE"  # "1": the site has its own DP-SGD budget, every task trains with opacus
LEARNED = ("opacus",)  # imported up front only where every task needs it (DP_SITE_ENV: supernode/warm.py);
# elsewhere the executor imports it after a task did (1.5 s of CPU at every start of every site that never
# trains with DP-SGD, against one task that imports it itself)
LEARNED_EVENT = "warm executor: imported for the tasks to come, as a task needed it:"


def can_fork() -> bool:
    """True where ``os.fork`` exists (not on Windows)."""
    return hasattr(os, "fork")


def task_threads() -> int:
    """torch threads per task: FLOWERBED_TORCH_THREADS, else this machine's cores."""
    try:
        return max(1, int(os.environ.get(THREADS_ENV, "0")) or os.cpu_count() or 1)
    except ValueError:
        return 1


def task_argv(spec: Any) -> list[str]:
    """The command line Flower's SubprocessExecutor would start for ``spec`` (flwr 1.42)."""
    command, address_arg = superexec.task_command(spec.task_type)
    args = [command, address_arg, spec.runtime_api_address, "--token", spec.token]
    if spec.insecure:
        args.append("--insecure")
    elif spec.root_certificates_path is not None:
        args += ["--root-certificates", spec.root_certificates_path]
    if spec.parent_pid is not None:
        args += ["--parent-pid", str(spec.parent_pid)]
    if spec.runtime_dependency_install:
        args.append("--allow-runtime-dependency-installation")
    return args


def _child(runner: Runner, argv: list[str], learn_fd: int = -1) -> None:
    """In the forked child: run the command, then leave without returning into the executor's loop.

    Its torch gets the task's threads back (the warm-up ran on one); the private wheel copies it made
    are deleted at the end (``os._exit`` runs no atexit handler). The modules of ``LEARNED`` it
    imported, which its parent lacks, are written to ``learn_fd`` (:meth:`ForkExecutor.learn`).
    """
    import torch

    from flowerbed.task import remove_wheel_copies

    code = 1
    lacking = [name for name in LEARNED if name not in sys.modules]  # the parent's modules, as forked
    try:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, signal.SIG_DFL)  # the executor's handlers are not this task's
        torch.set_num_threads(task_threads())
        sys.argv = argv
        runner()
        code = 0
    except SystemExit as exc:  # Flower ends every task with flwr_exit (sys.exit)
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except BaseException:  # noqa: BLE001 - whatever it was, this child ends here
        traceback.print_exc()
    finally:
        with contextlib.suppress(Exception):
            remove_wheel_copies()
            needed = [name for name in lacking if name in sys.modules]
            if needed and learn_fd >= 0:
                os.write(learn_fd, (" ".join(needed) + "\n").encode())
            sys.stdout.flush()
            sys.stderr.flush()
        os._exit(code)


@dataclass
class ForkExecutor:
    """Flower's ``Executor`` protocol (flwr 1.42): launches a task as a fork of this process."""

    runners: dict[str, Runner]  # task type (Flower's TaskType value) -> the command's main function
    children: dict[int, tuple[int, float]] = field(default_factory=dict)  # pid -> task id, start
    last_task: float = field(default_factory=time.monotonic)  # when a task last started or ended (or the start)
    _running: frozenset[int] = field(default_factory=frozenset)  # the children at the last poll
    learn_pipe: tuple[int, int] = field(init=False)  # (read, write): what the tasks imported that this process lacks

    def __post_init__(self) -> None:
        self.learn_pipe = os.pipe()
        os.set_blocking(self.learn_pipe[0], False)

    def poll_s(self, interval_s: float, now: float) -> float:
        """Seconds until the task loop asks again: its interval right after a task started or ended (the
        next round's task comes soon), growing to IDLE_POLL_S over RAMP_S (a slower interval asked for is kept)."""
        if frozenset(self.children) != self._running:
            self._running, self.last_task = frozenset(self.children), now
        ramp = (now - self.last_task) / RAMP_S * (IDLE_POLL_S - interval_s)
        return max(interval_s, min(IDLE_POLL_S, interval_s + ramp))

    def pause(self, interval_s: float) -> None:
        """The task loop's wait before it asks again (Flower's loop calls it with its interval)."""
        self.learn()
        time.sleep(self.poll_s(interval_s, time.monotonic()))

    def learn(self) -> list[str]:
        """Import the modules of ``LEARNED`` that a task needed and this process lacks (the next tasks fork
        with them); returns their names. In the task loop's thread, between polls: no thread is left
        for a fork to lose."""
        try:
            said = os.read(self.learn_pipe[0], 65536).decode(errors="replace").split()
        except (BlockingIOError, OSError):
            return []
        names = sorted({name for name in said if name in LEARNED and name not in sys.modules})
        imported = []
        for name in names:
            with contextlib.suppress(Exception):  # it stays each task's own import, as before
                importlib.import_module(name)
                imported.append(name)
        if imported:
            sys.stdout.write(f"{LEARNED_EVENT} {', '.join(imported)}\n")
            sys.stdout.flush()
        return imported

    def get_eligible_capacity(
        self, supported_task_types: set[Any], *, insecure: bool = False, root_certificates_path: str | None = None
    ) -> tuple[set[Any], set[str]]:
        """The task types this executor runs (Flower's Executor protocol)."""
        del insecure, root_certificates_path
        return {t for t in supported_task_types if str(t) in self.runners}, set()

    def wait_for_capacity(self, task_type: Any = None, **_kwargs: Any) -> None:
        """Never waits: a fork is always possible (Flower's Executor protocol)."""
        del task_type

    def launch(self, spec: Any) -> Any:
        """Fork this process to run ``spec``'s task; Flower's LaunchResult."""
        runner = self.runners.get(str(spec.task_type))
        if runner is None:
            return superexec.launched(f"the warm executor does not run {spec.task_type} tasks")
        argv = task_argv(spec)
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            os.close(self.learn_pipe[0])
            _child(runner, argv, self.learn_pipe[1])  # never returns
        self.children[pid] = (int(spec.task_id), time.monotonic())
        self.last_task = time.monotonic()
        sys.stdout.write(f"{TASK_STARTED} {spec.task_id} (pid {pid})\n")
        sys.stdout.flush()
        return superexec.launched()

    def reconcile(self) -> None:
        """Reap ended tasks; a task that died of a signal is reported, and the executor goes on."""
        for pid in list(self.children):
            try:
                done, status = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                done, status = pid, 0
            if done == 0:
                continue
            task_id, started = self.children.pop(pid)
            sys.stdout.write(f"{TASK_ENDED} {task_id} after {time.monotonic() - started:.2f} s\n")
            if os.WIFSIGNALED(status):
                name = signal.Signals(os.WTERMSIG(status)).name
                said = (
                    f"{TASK_EVENT} task {task_id} FAILED: its process died of {name} (pid {pid}); the executor goes on"
                )
                sys.stdout.write(said + "\n")  # read by the site's supervisor
            sys.stdout.flush()

    def close(self, grace_s: float = 5.0) -> None:
        """Stop the tasks still running (each pushes its failure to Flower on SIGTERM)."""
        for pid in self.children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        end = time.monotonic() + grace_s
        while self.children and time.monotonic() < end:
            self.reconcile()
            time.sleep(0.05)
        for pid in self.children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


QUICK_PULL_BACKOFF_S = 0.05  # first retry of an object that is not there yet (Flower's: 1 s)


def quick_object_pulls(cap_s: float | None = None, *, endless: bool = False) -> None:
    """Retry an object that is not there yet after 0.05 s (doubling as Flower's does), not after 1 s.

    A message is visible before its objects have arrived (the sender pushes them right after it), so
    the reader that comes too early waits ``PULL_INITIAL_BACKOFF`` = 1 s
    (``flwr/supercore/constant.py:48``): a ClientApp reading its task, a SuperNode its message, the
    ServerApp a reply, up to a second each, every round. flwr 1.42's callers all take the default
    of ``pull_objects`` and ``pull_and_inflate_object_from_tree``, so this sets that default.
    ``cap_s``: the longest wait between two tries (Flower's: 10 s), for a reader on loopback.
    ``endless``: an object is tried until it arrives or its sender says it is gone (not 500 times).
    """
    superexec.object_pull_backoff(QUICK_PULL_BACKOFF_S, cap_s, endless=endless)


def warm_up_torch() -> None:
    """Pay torch's one-time costs once: the first optimizer imports about 800 modules (over a second).

    One thread, and tensors far below torch's parallel grain: no OpenMP pool exists to break at fork.
    """
    import torch

    torch.set_num_threads(1)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    optimizers = (torch.optim.Adam(model.parameters()), torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9))
    for optimizer in optimizers:
        loss = torch.nn.functional.cross_entropy(model(torch.randn(8, 4)), torch.randint(0, 2, (8,)))
        optimizer.zero_grad()
        loss.backward()  # type: ignore[no-untyped-call]
        optimizer.step()


def serve(runners: dict[str, Runner], preload: Callable[[], None]) -> None:
    """Flower's ``flower-superexec`` (same flags) with the fork executor, after ``preload``.

    ``preload`` imports what every task needs; it must not start threads (fork keeps only the
    calling thread) nor run parallel torch operations (an OpenMP pool does not survive a fork):
    :func:`warm_up_torch` is safe.
    """
    os.environ.setdefault(POLL_ENV, POLL_S)
    try:
        preload()
        executor = ForkExecutor(runners)
        superexec.pace_task_polls(executor.pause)
        superexec.run_superexec(executor)
    except (HookError, FlowerbedError) as exc:
        raise SystemExit(exc.message) from None
