"""A study's task as a small installable package: scaffold it, check it without Flower, build its wheel."""

from __future__ import annotations

import importlib
import sys
import tempfile
import tomllib
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flowerbed.artifacts import TASK_GROUP, sha256_file
from flowerbed.config import TASK_NAME
from flowerbed.datasummary import DataSummary, problems, summarize
from flowerbed.deploy.bundle import run_pip
from flowerbed.errors import FlowerbedError
from flowerbed.task import LocalRound, Task, check_interface, local_round, task_config

Report = Any


def module_name(name: str) -> str:
    """The Python module of an own task named ``name``."""
    return "flowerbed_task_" + name.replace("-", "_")


PYPROJECT = """[build-system]
requires = ["setuptools>=68"]
build-backend = "setuptools.build_meta"

[project]
name = "flowerbed-task-{name}"
version = "0.1.0"
description = "The {name} task for flowerbed: model, data loading, training and metrics"
requires-python = ">=3.10"
# torch and flowerbed are at every site already; list what else the task imports (and ship
# its wheels with `flowerbed kit build --task`).
dependencies = []

[project.entry-points."{group}"]
{name} = "{module}.task:task"

[tool.setuptools]
packages = ["{module}"]
"""

TASK = '''"""The {name} task: fill in the model, the loading of your files, training and the metrics that matter.

flowerbed calls only these members (see flowerbed.task.Task). Every metric evaluate() returns is in
the run table, the history and the plot, and can drive the run (target_metric = "auroc").
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, Field
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from flowerbed.clientapp.data import DataError


class Config(BaseModel):
    """This task's own settings, with defaults.

    These defaults hold in every run unless the coordinator sets a value: keys that flowerbed's run
    settings also have (num_features, hidden_units, local_epochs, batch_size, learning_rate,
    validation_fraction, seed) when federation.toml's [run] table or a `flowerbed run` option gives
    them; any key by [run.task_settings] in federation.toml or `--task-setting KEY=VALUE`. A run's
    start shows every value and where it came from.
    """

    num_features: int = Field(30, ge=1)
    hidden_units: int = Field(32, ge=1)
    local_epochs: int = Field(3, ge=1)
    batch_size: int = Field(32, ge=1)
    learning_rate: float = Field(0.01, gt=0)
    validation_fraction: float = Field(0.2, gt=0, lt=1)
    seed: int = 42


BINS = 200  # score bins of the pooled AUROC


class Task:
    name = "{name}"
    Config = Config

    def model(self, config: Config) -> nn.Module:
        return nn.Sequential(nn.Linear(config.num_features, config.hidden_units), nn.ReLU(),
                             nn.Linear(config.hidden_units, 2))

    def load_data(self, path: Path, config: Config) -> tuple[Dataset[Any], Dataset[Any]]:
        """A CSV file with a 0/1 `target` column and numeric features: replace with your own loader."""
        file = path if path.is_file() else next(iter(sorted(path.glob("*.csv"))), None)
        if file is None:
            raise DataError(f"{{path}}: no CSV file")
        with file.open(newline="") as handle:
            rows = list(csv.DictReader(handle))
        if not rows or "target" not in rows[0]:
            raise DataError(f"{{file}}: needs a header with a 'target' column")
        x = torch.tensor([[float(v) for k, v in r.items() if k != "target"] for r in rows])
        y = torch.tensor([int(float(r["target"])) for r in rows])
        x = (x - x.mean(0)) / (x.std(0) + 1e-6)
        order = torch.randperm(len(y), generator=torch.Generator().manual_seed(config.seed))
        cut = max(1, int(len(y) * config.validation_fraction))
        val, train = order[:cut], order[cut:]
        return TensorDataset(x[train], y[train]), TensorDataset(x[val], y[val])

    def train(self, model: nn.Module, data: Dataset[Any], config: Config) -> dict[str, float]:
        loader = DataLoader(data, batch_size=config.batch_size, shuffle=True,
                            generator=torch.Generator().manual_seed(config.seed))
        optimizer = torch.optim.Adam(model.parameters(), lr=config.learning_rate)
        model.train()
        total, count = 0.0, 0
        for _ in range(config.local_epochs):
            total, count = 0.0, 0
            for xb, yb in loader:
                optimizer.zero_grad()
                loss = nn.functional.cross_entropy(model(xb), yb)
                loss.backward()
                optimizer.step()
                total, count = total + loss.item() * len(yb), count + len(yb)
        return {{"loss": total / max(count, 1)}}

    @torch.no_grad()
    def evaluate(self, model: nn.Module, data: Dataset[Any], config: Config) -> dict[str, float]:
        model.eval()
        x, y = next(iter(DataLoader(data, batch_size=len(data))))  # type: ignore[arg-type]
        logits = model(x)
        score = logits.softmax(1)[:, 1]
        predicted = logits.argmax(1)
        tp = float(((predicted == 1) & (y == 1)).sum())
        tn = float(((predicted == 0) & (y == 0)).sum())
        pos, neg = score[y == 1], score[y == 0]
        pairs = (pos[:, None] > neg[None, :]).float() + 0.5 * (pos[:, None] == neg[None, :]).float()  # ties: half
        auroc = float(pairs.mean()) if len(pos) and len(neg) else float("nan")
        return {{
            "loss": float(nn.functional.cross_entropy(logits, y)),
            "accuracy": (tp + tn) / max(len(y), 1),
            "auroc": auroc,
            "sensitivity": tp / max(float((y == 1).sum()), 1.0),
            "specificity": tn / max(float((y == 0).sum()), 1.0),
        }}

    @torch.no_grad()
    def statistics(self, model: nn.Module, data: Dataset[Any], config: Config) -> dict[str, float]:
        """Counts the coordinator sums over the sites for `pooled` (optional, with `pooled`): how many
        positive and negative examples fall in each of BINS score bins."""
        model.eval()
        x, y = next(iter(DataLoader(data, batch_size=len(data))))  # type: ignore[arg-type]
        bins = (model(x).softmax(1)[:, 1] * BINS).long().clamp(max=BINS - 1)
        counts = {{}}
        for b in range(BINS):
            counts[f"pos{{b}}"] = float(((bins == b) & (y == 1)).sum())
            counts[f"neg{{b}}"] = float(((bins == b) & (y == 0)).sum())
        return counts

    def pooled(self, sums: dict[str, float]) -> dict[str, float]:
        """The AUROC of all sites' predictions as one, from their summed score counts (ties count half):
        the mean of per-site AUROCs is not that."""
        below, area = 0.0, 0.0
        for b in range(BINS):
            pos, neg = sums[f"pos{{b}}"], sums[f"neg{{b}}"]
            area += pos * (below + neg / 2)
            below += neg
        positives = sum(sums[f"pos{{b}}"] for b in range(BINS))
        return {{"auroc": area / (positives * below)}} if positives and below else {{}}

    @staticmethod
    def example_data(folder: Path) -> Path:
        """Synthetic data in the format load_data reads (for `flowerbed task check` and the test)."""
        generator = torch.Generator().manual_seed(0)
        x = torch.randn(120, 30, generator=generator)
        y = (x[:, 0] + 0.5 * x[:, 1] > 0).int()
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / "example.csv"
        with path.open("w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow([*(f"f{{i}}" for i in range(30)), "target"])
            writer.writerows([*map(float, row), int(label)] for row, label in zip(x.tolist(), y.tolist()))
        return path


task = Task()
'''

TEST = '''"""One local round of the {name} task on synthetic data, as `flowerbed task check` runs it."""

from pathlib import Path

from flowerbed.task import local_round, task_config
from {module}.task import task


def test_one_local_round(tmp_path: Path) -> None:
    config = task_config(task, {{}})
    result = local_round(task, task.example_data(tmp_path), config)
    assert result.after["loss"] < result.before["loss"]
'''

README = """# flowerbed task: {name}

What to fill in, in `{module}/task.py`:
- `Config`: your task's own settings with their defaults, which hold unless the coordinator sets a
  value (keys that flowerbed's `[run]` table also has, such as `local_epochs` or `learning_rate`,
  when `federation.toml` or a `flowerbed run` option gives them; any key by `[run.task_settings]`
  there, or `flowerbed run --task-setting KEY=VALUE`; the run's start shows where each came from);
- `model(config)`: your architecture;
- `load_data(path, config)`: your file formats and preprocessing, returning (train, validation);
- `train(model, data, config)`: your training loop (optimizer, augmentation, class weights);
- `evaluate(model, data, config)`: the metrics that matter (AUROC, sensitivity, specificity, ...);
  the coordinator combines each as the mean of the sites' values, weighted by their examples;
- `statistics(model, data, config)` and `pooled(sums)` (optional): a metric computed as if all
  sites' data were one (here the AUROC of the pooled predictions, from score counts each site sends
  and the coordinator sums), which a mean of per-site AUROCs is not; outputs mark it `pooled`.

Then:

    flowerbed task check .        # the interface, and one local round on example data (no Flower)
    flowerbed task build .        # the wheel and its sha256, for each site's data steward to approve

Each site's data steward approves the wheel (`flowerbed supernode approve WHEEL` in the site's kit);
the coordinator runs it with `flowerbed run --task dist/WHEEL`. Keep the task pure Python: it is
imported from the wheel itself; compiled code belongs in a dependency.
"""


def new_task(folder: Path, name: str) -> Path:
    """Write the package of a new task called ``name`` into ``folder/NAME``; its path."""
    if not TASK_NAME.fullmatch(name):
        raise FlowerbedError(f"task name {name!r}: use 2-41 lower-case letters, digits and hyphens, e.g. ct-triage")
    root = folder / name
    if root.exists():
        raise FlowerbedError(f"{root} already exists: choose another name or folder")
    module = module_name(name)
    values = {"name": name, "module": module, "group": TASK_GROUP}
    for rel, text in (("pyproject.toml", PYPROJECT), (f"{module}/__init__.py", '"""The {name} task."""\n'),
                      (f"{module}/task.py", TASK), ("tests/test_task.py", TEST), ("README.md", README)):  # fmt: skip
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text.format(**values), encoding="utf-8")
    return root


@dataclass(frozen=True)
class TaskSource:
    """An own task's source folder: its name, module and files."""

    name: str
    module: str
    version: str
    root: Path


def read_source(path: Path) -> TaskSource:
    """The task package in folder ``path`` (its pyproject names the task's entry point)."""
    pyproject = path / "pyproject.toml"
    if not pyproject.is_file():
        raise FlowerbedError(f"{path} is not a task package (no pyproject.toml): make one with `flowerbed task new`")
    data = tomllib.loads(pyproject.read_text(encoding="utf-8"))
    points = data.get("project", {}).get("entry-points", {}).get(TASK_GROUP, {})
    if len(points) != 1:
        raise FlowerbedError(f'{pyproject} must name exactly one task under [project.entry-points."{TASK_GROUP}"]')
    ((name, target),) = points.items()
    return TaskSource(name, target, str(data["project"].get("version", "?")), path.resolve())


def import_source(source: TaskSource) -> Task:
    """Import the task from its source folder (not an installed copy)."""
    sys.path.insert(0, str(source.root))
    try:
        module_name_, _, attr = source.module.partition(":")
        top = module_name_.split(".")[0]
        for loaded in [m for m in sys.modules if m == top or m.startswith(top + ".")]:
            del sys.modules[loaded]  # a copy imported before (or installed) must not stand in for the source
        task = getattr(importlib.import_module(module_name_), attr)
    except Exception as exc:  # noqa: BLE001 - the task's own code: say what failed, in one line
        raise FlowerbedError(
            f"importing {source.module} from {source.root} failed: {type(exc).__name__}: {exc}"
        ) from None
    finally:
        sys.path.remove(str(source.root))
    check_interface(task, source.name)
    return task  # type: ignore[no-any-return]


STEPS = ("load_data", "model", "train", "evaluate", "statistics", "pooled", "example_data")


class TaskCodeError(FlowerbedError):
    """The task's own code failed: names its function and line; ``trace`` is the whole traceback."""

    def __init__(self, message: str, trace: str) -> None:
        super().__init__(message)
        self.trace = trace


def task_failure(source: TaskSource, exc: BaseException) -> TaskCodeError:
    """``exc`` raised in the task's code, said as the task's function that failed and the line in its file."""
    frames = [f for f in traceback.extract_tb(exc.__traceback__)
              if Path(f.filename).resolve().is_relative_to(source.root)]  # fmt: skip
    step = next((f.name for f in frames if f.name in STEPS), None)
    where = ""
    if frames:
        last = frames[-1]
        where = f" at {Path(last.filename).resolve().relative_to(source.root)}:{last.lineno}"
    said = f"{type(exc).__name__}: {exc}"
    if "Size mismatch between tensors" in str(exc):
        said += " (features and labels of different lengths)"
    what = f"{step} failed{where}" if step else f"a local round failed{where}"
    trace = "".join(traceback.format_exception(exc))
    return TaskCodeError(f"task {source.name}: {what}: {said} (the whole trace: --traceback)", trace)


@dataclass(frozen=True)
class CheckResult:
    """What `flowerbed task check` found: per data file, the data's summary and one local round."""

    files: list[tuple[Path, list[DataSummary], LocalRound]]
    problems: list[str]


def check_source(path: Path, data: list[Path] | None = None, values: dict[str, Any] | None = None) -> CheckResult:
    """The interface checks, then for each data file (default: the task's ``example_data``) a summary of
    what ``load_data`` loaded and one local round. Raises :class:`TaskCodeError` naming the failing
    function and line; the data's problems (labels out of range, one class, NaNs) come back listed."""
    source = read_source(path)
    task = import_source(source)
    if task.name != source.name:
        raise FlowerbedError(
            f"task {source.root.name}: its name is {task.name!r} but pyproject.toml's entry point names it "
            f"{source.name!r}: make them the same (runs and approvals go by the entry point's name)"
        )
    config = task_config(task, values or {})
    files: list[tuple[Path, list[DataSummary], LocalRound]] = []
    found: list[str] = []
    with tempfile.TemporaryDirectory() as tmp:
        try:
            if not data:
                example = getattr(task, "example_data", None)
                if example is None:
                    raise FlowerbedError(f"task {source.name} has no example_data(folder): pass --data PATH")
                data = [Path(example(Path(tmp)))]
            for file in data:
                train, validation = task.load_data(file, config)
                summaries = [summarize("train", train), summarize("validation", validation)]
                outputs = _outputs(task.model(config), train)
                issues = [f"{file}: {line}" for line in problems(summaries, outputs)]
                found += issues
                if issues:
                    continue  # a local round on such data says nothing more
                files.append((file, summaries, local_round(task, file, config)))
        except FlowerbedError:
            raise
        except Exception as exc:  # noqa: BLE001 - the task's own code
            raise task_failure(source, exc) from None
    return CheckResult(files, found)


def _outputs(model: Any, data: Any) -> int | None:
    """How many classes the model scores (its output's last size for one row; None: not a classifier)."""
    import torch

    if len(data) == 0:
        return None
    x = torch.as_tensor(data[0][0]).float().unsqueeze(0)
    with torch.no_grad():
        out = model.eval()(x) if hasattr(model, "eval") else model(x)
    return int(out.shape[-1]) if getattr(out, "ndim", 0) >= 2 and out.shape[-1] > 1 else None


def build_source(path: Path, out: Path, report: Report) -> tuple[Path, str]:
    """Build the task's wheel into ``out`` (offline: no build isolation); the wheel and its sha256."""
    source = read_source(path)
    out.mkdir(parents=True, exist_ok=True)
    before = set(out.glob("*.whl"))
    run_pip(["wheel", "--no-deps", "--no-build-isolation", "--wheel-dir", str(out), str(source.root)], report,
            f"building the wheel of task {source.name}")  # fmt: skip
    built = sorted(set(out.glob("*.whl")) - before) or sorted(out.glob(f"{module_name(source.name)}-*.whl"))
    if not built:
        raise FlowerbedError(f"pip built no wheel for {source.root}")
    return built[-1], sha256_file(built[-1])
