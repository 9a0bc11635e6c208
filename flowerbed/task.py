"""The task interface: a study's model, data loading, training loop and metrics.

A task is any object with the members of :class:`Task`; flowerbed's ServerApp and ClientApp call
only these, so the built-in tasks (``tabular``: an MLP on a CSV file, ``images``: a small CNN on
folders of class sub-folders) and a research group's own task take the same path. Metrics are
named floats; every metric a task reports reaches the history, the table and the plot, and any
of them can drive the run (``target_metric``, ``target_mode``).

A run names a built-in task, or an own task by name and the sha256 of its wheel. An own task is
imported from that wheel only (the wheel names it under ``[project.entry-points."flowerbed.tasks"]``),
never from whatever else is installed: at a site, only a wheel its data steward approved.
"""

from __future__ import annotations

import atexit
import contextlib
import importlib
import math
import os
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from pydantic import BaseModel, ValidationError

from flowerbed.artifacts import WheelInfo, read_task_wheel, sha256_bytes
from flowerbed.config import (
    FROM_DEFAULT,
    FROM_TASK,
    IMAGE_KEYS,
    LOOP_KEYS,
    TABULAR_KEYS,
    ConfigError,
    RunSettings,
    format_validation_error,
    given_settings,
    task_settings_of,
)
from flowerbed.errors import FlowerbedError

if TYPE_CHECKING:
    from torch import nn
    from torch.utils.data import Dataset

Metrics = dict[str, float]
RUN_TASK_WHEEL = "task.whl"  # an own task's wheel in a run folder, which the ServerApp imports it from
BUILTIN = {"tabular": "flowerbed.clientapp.builtin:tabular", "images": "flowerbed.clientapp.builtin:images"}


@runtime_checkable
class Task(Protocol):
    """What a task provides. ``config`` is an instance of the task's own ``Config`` model."""

    name: str
    Config: type[BaseModel]  # the task's own run-config keys, with defaults, validated by pydantic

    def model(self, config: Any) -> nn.Module:
        """A fresh model (the same architecture at the coordinator and every site)."""
        ...

    def load_data(self, path: Path, config: Any) -> tuple[Dataset[Any], Dataset[Any]]:
        """The site's (train, validation) data from ``path``; raise ``DataError`` naming what is wrong."""
        ...

    def train(self, model: nn.Module, data: Dataset[Any], config: Any) -> Metrics:
        """Train ``model`` in place on ``data``; metrics of the training (e.g. ``loss``)."""
        ...

    def evaluate(self, model: nn.Module, data: Dataset[Any], config: Any) -> Metrics:
        """Metrics of ``model`` on ``data`` (e.g. ``loss``, ``accuracy``, ``auroc``)."""
        ...


# Optional members of a task (not part of the Protocol): metrics computed from the sites' pooled data.
#
#   def statistics(self, model, data, config) -> Metrics:
#       """Additive statistics of ``model`` on ``data`` (counts, a confusion matrix, calibration bins, score
#       histograms): the coordinator sums them over the sites."""
#   def pooled(self, sums: Metrics) -> Metrics:
#       """Metrics from the summed statistics: their value on all sites' data as one (e.g. the AUROC of
#       the pooled predictions, which the mean of per-site AUROCs is not)."""
#
# A metric ``pooled`` returns replaces the weighted mean of ``evaluate``'s metric of the same name,
# and every output says which of the two each metric is (``RoundRow.pooled``).
POOLED = "pooled"
WEIGHTED = "weighted mean"


def pools(task: Any) -> bool:
    """True when the task computes pooled metrics (it has ``statistics`` and ``pooled``)."""
    return callable(getattr(task, "statistics", None)) and callable(getattr(task, "pooled", None))


def site_statistics(task: Any, model: nn.Module, data: Dataset[Any], config: Any) -> Metrics | None:
    """The task's additive statistics of ``model`` on a site's ``data`` (None: it pools no metric)."""
    if not pools(task):
        return None
    return check_metrics(task.statistics(model, data, config), f"{task.name}.statistics")


def pool_metrics(task: Any, each: list[Metrics]) -> Metrics:
    """The task's pooled metrics from each site's statistics, summed key by key."""
    total: Metrics = {}
    for sums in each:
        for key, value in sums.items():
            total[key] = total.get(key, 0.0) + float(value)
    return check_metrics(task.pooled(total), f"{task.name}.pooled")


def _load_object(target: str) -> Any:
    module_name, _, attr = target.partition(":")
    obj = importlib.import_module(module_name)
    for part in attr.split("."):
        obj = getattr(obj, part)
    return obj() if isinstance(obj, type) else obj


def available() -> dict[str, str]:
    """The built-in tasks: name -> ``module:object``."""
    return dict(BUILTIN)


_APPROVED: dict[str, Path] = {}  # sha256 -> wheel, filled by a site's gate after its approval check
_WARM: dict[tuple[str, str], Any] = {}  # (sha256, name) -> task imported up front by a site's warm executor
_COPIES: list[tuple[int, str]] = []  # (pid, path) of the private wheel copies this process imports from
_ON_PATH: dict[str, WheelInfo] = {}  # wheel copy on sys.path -> what it is (its top-level modules)
_IMPORTED: dict[str, ImportedCode] = {}  # wheel sha256 -> the files its task was imported from


@dataclass(frozen=True)
class ImportedCode:
    """What a task's import read: each file of the wheel that was imported, with its sha256 as RECORD lists it."""

    wheel_sha256: str
    files: dict[str, str]  # path in the wheel -> sha256

    @property
    def sha256(self) -> str:
        """One digest over the imported files (``path sha256`` lines, sorted): the code that actually runs."""
        return sha256_bytes("".join(f"{path} {digest}\n" for path, digest in sorted(self.files.items())).encode())


def allow_wheel(sha256: str, wheel: Path) -> None:
    """Let :func:`load_task` import the task of ``wheel`` (a site's gate calls it for an approved wheel)."""
    _APPROVED[sha256] = wheel


def imported_code(sha256: str) -> ImportedCode | None:
    """The files the task of wheel ``sha256`` was imported from in this process (None: not imported here)."""
    return _IMPORTED.get(sha256)


def load_task(name: str, sha256: str = "", wheel: Path | None = None) -> Task:
    """The task a run names: a built-in one, or own task ``name`` from the wheel with ``sha256``.

    ``wheel``: where that wheel is (the coordinator's copy in the run folder); at a site the gate
    says which wheel was approved (:func:`allow_wheel`), and nothing else is imported.
    """
    if not sha256:
        if name not in BUILTIN:
            raise FlowerbedError(
                f"{name!r} is not a built-in task ({', '.join(sorted(BUILTIN))}); an own task runs from its "
                "wheel: `flowerbed run --task TASK.whl` (build it with `flowerbed task build`)"
            )
        task = _load_object(BUILTIN[name])
    else:
        path = wheel or _APPROVED.get(sha256)
        if path is None:
            raise FlowerbedError(
                f"task {name} (sha256 {sha256[:12]}) is not approved here: the SuperNode must run under "
                "`flowerbed supernode start`, which checks the site's approvals"
            )
        # The warm executor imported the approved wheel of this hash already; the gate said yes again.
        warm = _WARM.get((sha256, name)) if wheel is None else None
        task = warm if warm is not None and _still_loaded(sha256) else load_wheel_task(path, name, sha256)
    check_interface(task, name)
    return task  # type: ignore[no-any-return]


def preload_wheel_task(path: Path, name: str, sha256: str) -> None:
    """Import an approved task before any run asks for it (the site's warm executor, at its start).

    A wheel whose top-level modules another preloaded wheel has already is not preloaded: each of
    the two is imported from its own wheel when a run asks for it.
    """
    info = read_task_wheel(path)
    for other in _ON_PATH.values():
        shared = set(other.modules) & set(info.modules)
        if shared:
            raise FlowerbedError(
                f"it shares module {', '.join(sorted(shared))} with approved {other.dist} {other.version} "
                f"(sha256 {other.sha256}): it is imported from its own wheel when a run asks for it"
            )
    _WARM[(sha256, name)] = load_wheel_task(path, name, sha256)


def remove_wheel_copies() -> None:
    """Delete the private wheel copies this process made (a forked task runs no atexit handlers)."""
    for pid, copy in list(_COPIES):
        if pid == os.getpid():
            Path(copy).unlink(missing_ok=True)
            _COPIES.remove((pid, copy))


atexit.register(remove_wheel_copies)


def _inside(module: Any, copy: str) -> bool:
    file = getattr(module, "__file__", None) or ""
    return file.startswith(copy + os.sep) or file.startswith(copy + "/")


def _isolate(copy: str, info: WheelInfo) -> None:
    """Before importing from ``copy``: forget every module of its top-level names that came from elsewhere.

    Another wheel with the same top-level module (a later version of the same task, or another task
    reusing its name) leaves its copy on sys.path and its modules in sys.modules; neither may stand
    in for this wheel's code.
    """
    tops = set(info.modules)
    for other, other_info in list(_ON_PATH.items()):
        if other != copy and tops & set(other_info.modules):
            with contextlib.suppress(ValueError):
                sys.path.remove(other)
            del _ON_PATH[other]
            _IMPORTED.pop(other_info.sha256, None)
    for loaded in [m for m in sys.modules if m.split(".")[0] in tops]:
        if not _inside(sys.modules[loaded], copy):
            del sys.modules[loaded]
    importlib.invalidate_caches()


def _verify_imported(copy: str, info: WheelInfo, name: str) -> ImportedCode:
    """Every loaded module of the wheel's top-level names came from ``copy``, byte for byte as its RECORD says."""
    files: dict[str, str] = {}
    with zipfile.ZipFile(copy) as archive:
        for loaded, module in list(sys.modules.items()):
            if loaded.split(".")[0] not in info.modules or getattr(module, "__file__", None) is None:
                continue
            if not _inside(module, copy):
                raise FlowerbedError(
                    f"task {name}: module {loaded} was loaded from {module.__file__}, not from the approved wheel "
                    f"(sha256 {info.sha256}): refused; restart the SuperNode"
                )
            inner = str(module.__file__)[len(copy) + 1 :].replace(os.sep, "/")
            digest = sha256_bytes(archive.read(inner))
            if info.record.get(inner) != digest:
                raise FlowerbedError(
                    f"task {name}: {inner} in the wheel (sha256 {info.sha256}) does not match the wheel's RECORD: "
                    "the wheel was altered; build it again"
                )
            files[inner] = digest
    return ImportedCode(info.sha256, files)


def _still_loaded(sha256: str) -> bool:
    """The preloaded task of wheel ``sha256`` is still what sys.modules holds for its modules."""
    copy = next((c for c, i in _ON_PATH.items() if i.sha256 == sha256), None)
    if copy is None:
        return False
    try:
        _IMPORTED[sha256] = _verify_imported(copy, _ON_PATH[copy], "")
    except FlowerbedError:
        return False
    return True


def load_wheel_task(path: Path, name: str, sha256: str) -> Any:
    """Import task ``name`` from the wheel at ``path``, which must have ``sha256``.

    The bytes are read once, hashed, and the import runs from a private copy of exactly those
    bytes: a file swapped after the check is never imported. Modules of the same top-level names
    from another wheel are forgotten first, and afterwards every loaded module of those names must
    come from this copy and match the wheel's RECORD (:func:`imported_code` says which files).
    """
    data = path.read_bytes()
    if sha256_bytes(data) != sha256:
        raise FlowerbedError(
            f"{path.name} was modified: its sha256 is {sha256_bytes(data)[:12]}, the run names {sha256[:12]}"
        )
    fd, copy = tempfile.mkstemp(prefix=f"task-{sha256[:12]}-", suffix=".whl")
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)
    _COPIES.append((os.getpid(), copy))
    info = read_task_wheel(Path(copy))
    target = info.task_target(name)
    _isolate(copy, info)
    sys.path.insert(0, copy)
    _ON_PATH[copy] = info
    try:
        task = _load_object(target)
    except Exception as exc:  # noqa: BLE001 - the task's own code: said in one line
        raise FlowerbedError(f"task {name}: importing {target} failed: {type(exc).__name__}: {exc}") from None
    _IMPORTED[sha256] = _verify_imported(copy, info, name)
    return task


def check_interface(task: Any, name: str) -> None:
    """Every member of :class:`Task` is there, and ``Config`` is a pydantic model with defaults."""
    missing = [m for m in ("name", "Config", "model", "load_data", "train", "evaluate") if not hasattr(task, m)]
    if missing:
        raise FlowerbedError(f"task {name!r} lacks {', '.join(missing)} (see flowerbed.task.Task)")
    config_model = task.Config
    if not (isinstance(config_model, type) and issubclass(config_model, BaseModel)):
        raise FlowerbedError(f"task {name!r}: Config must be a pydantic BaseModel class")


def task_config(task: Task, values: dict[str, Any]) -> BaseModel:
    """The task's own settings from run-config ``values``.

    Keys the task's ``Config`` shares with the run settings (``local_epochs`` ...) come from there
    when they were given (federation.toml, a flag; ``SOURCES_KEY``), else the task's defaults hold;
    ``task_settings`` (``[run.task_settings]`` in federation.toml, ``--task-setting KEY=VALUE``) set
    the task's own keys, and one the task does not have is refused by name.
    """
    fields = set(task.Config.model_fields)
    own = task_settings_of(values)
    unknown = sorted(k for k in own if k.replace("-", "_") not in fields)
    if unknown:
        raise ConfigError(
            f"task {task.name} has no setting {', '.join(unknown)} (its settings: {', '.join(sorted(fields))})"
        )
    given = given_settings(values)  # None: an older run config, where every value counts as given
    data = {k.replace("-", "_"): v for k, v in values.items() if "." not in k}
    if given is not None and task.Config is not RunSettings:  # the built-in tasks' defaults are the run's
        data = {k: v for k, v in data.items() if k in given}
    data |= {k.replace("-", "_"): v for k, v in own.items()}
    try:
        return task.Config.model_validate({k: v for k, v in data.items() if k in fields})
    except ValidationError as exc:
        details = format_validation_error(f"task {task.name}", exc)
        raise ConfigError(f"task {task.name}: invalid run settings ({len(details)} problem(s))", details) from None


@dataclass(frozen=True)
class Setting:
    """One setting a run trains with, and where its value came from (federation.toml, a flag, a default)."""

    key: str
    value: Any
    source: str


def effective_settings(task: Task, settings: RunSettings) -> tuple[list[Setting], list[str]]:
    """The run's settings as its task sees them, each with its source; and the settings given that the
    task has no use for (``--local-epochs`` for an own task without ``local_epochs``).

    The loop's settings come first, then the task's: an own task's every ``Config`` key (its default
    unless given), a built-in task's keys (``TABULAR_KEYS``, ``IMAGE_KEYS``).
    """
    config = task_config(task, settings.to_run_config())
    sources = settings.sources()
    rows = [Setting(key, getattr(settings, key), sources.get(key, FROM_DEFAULT)) for key in LOOP_KEYS
            if getattr(settings, key) is not None]  # fmt: skip
    if task.Config is RunSettings:
        keys = IMAGE_KEYS if task.name == "images" else TABULAR_KEYS
        keys = (*keys, "hidden_units") if task.name == "images" and settings.model == "mlp" else keys
        rows += [Setting(key, getattr(config, key), sources.get(key, FROM_DEFAULT)) for key in keys]
        return rows, []
    fields = type(config).model_fields
    for key in fields:
        source = sources.get(f"task_settings.{key}") or sources.get(key) or FROM_TASK
        rows.append(Setting(key, getattr(config, key), source))
    from flowerbed.scaling import scaling_layers  # torch: only once a task is loaded

    if scaling_layers(task.model(config)):  # the loop fills an own task's FeatureScaling layer too
        rows.append(Setting("standardize_features", settings.standardize_features,
                            sources.get("standardize_features", FROM_DEFAULT)))  # fmt: skip
    kit_only = {"standardize_features"}  # the loop's, for any task (it has no use without a FeatureScaling layer)
    unused = sorted({*TABULAR_KEYS, *IMAGE_KEYS, "hidden_units"} - kit_only & set(sources) - set(fields))
    return rows, unused


def check_metrics(metrics: Any, what: str) -> Metrics:
    """A task's metrics as named finite-or-NaN floats; anything else is the task's error, said plainly."""
    if not isinstance(metrics, dict):
        raise FlowerbedError(f"{what} returned {type(metrics).__name__}, not a dict of named floats")
    out: Metrics = {}
    for key, value in metrics.items():
        if not isinstance(key, str) or not key or any(c in key for c in " :,"):
            raise FlowerbedError(f"{what} returned a metric named {key!r}: use names like 'auroc'")
        try:
            out[key] = float(value)
        except (TypeError, ValueError):
            raise FlowerbedError(f"{what} returned {key}={value!r}, not a number") from None
    return out


@dataclass(frozen=True)
class LocalRound:
    """What one local round of a task did (no Flower involved)."""

    num_train: int
    num_validation: int
    before: Metrics
    train: Metrics
    after: Metrics
    seconds: float
    pooled: Metrics = field(default_factory=dict)  # after training, from this site's statistics alone


def local_round(task: Task, data_path: Path, config: BaseModel) -> LocalRound:
    """Load, evaluate, train and evaluate again, as a site does in one round; checks the metrics."""
    start = time.monotonic()
    train_data, validation = task.load_data(data_path, config)
    model = task.model(config)
    from flowerbed.scaling import fit_scaling

    fit_scaling(model, train_data)  # alone, a site standardizes with its own statistics
    before = check_metrics(task.evaluate(model, validation, config), f"{task.name}.evaluate")
    trained = check_metrics(task.train(model, train_data, config), f"{task.name}.train")
    after = check_metrics(task.evaluate(model, validation, config), f"{task.name}.evaluate")
    for metrics in (before, after):
        if not any(math.isfinite(v) for v in metrics.values()):
            raise FlowerbedError(f"{task.name}.evaluate returned no finite metric: {metrics}")
    sums = site_statistics(task, model, validation, config)
    pooled = pool_metrics(task, [sums]) if sums is not None else {}
    return LocalRound(len(train_data), len(validation), before, trained, after, time.monotonic() - start,  # type: ignore[arg-type]
                      pooled)  # fmt: skip
