"""``flowerbed app new``: a minimal Flower App written offline (``flwr new`` in flwr 1.42 fetches its
templates from Flower's service, which a locked-down coordinator cannot reach).

The app follows the kit's conventions: each site's data is the CSV file its SuperNode names
(``data-path`` in the node config, a ``target`` column of class labels), nothing is downloaded, and
the ServerApp runs Flower's FedAvg, whose round lines ``flowerbed run --app`` shows as a table.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from flowerbed.config import TASK_NAME
from flowerbed.errors import FlowerbedError

Api = Literal["numpy", "pytorch"]

PYPROJECT = """[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "{name}"
version = "1.0.0"
description = "A Flower App made by `flowerbed app new` ({api} API)"
license = "Apache-2.0"
dependencies = ["flwr>=1.42,<1.43", "numpy"{torch}]

[tool.hatch.build.targets.wheel]
packages = ["."]

[tool.flwr.app]
publisher = "flowerbed"

[tool.flwr.app.components]
serverapp = "{module}.server_app:app"
clientapp = "{module}.client_app:app"

[tool.flwr.app.config]
num-server-rounds = 3
local-epochs = 5
learning-rate = 0.1
"""

DATA = '''"""The site's data: the CSV file its SuperNode names (node config ``data-path``), a ``target`` column."""

import csv
from pathlib import Path

import numpy as np


def load(context, validation_fraction: float = 0.2, seed: int = 42):
    """(x_train, y_train, x_val, y_val), features standardized with this site's own statistics."""
    path = Path(str(context.node_config["data-path"]))
    with path.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    y = np.array([int(float(r.pop("target"))) for r in rows])
    x = np.array([[float(v) for v in r.values()] for r in rows])
    x = (x - x.mean(0)) / (x.std(0) + 1e-6)
    order = np.random.default_rng(seed).permutation(len(y))
    cut = max(1, int(len(y) * validation_fraction))
    val, train = order[:cut], order[cut:]
    return x[train], y[train], x[val], y[val]
'''

NUMPY_CLIENT = '''"""ClientApp (NumPy API): logistic regression, trained on the site's data, which never leaves it."""

import numpy as np
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from {module}.data import load

app = ClientApp()


def _loss_acc(w, b, x, y):
    p = 1 / (1 + np.exp(-(x @ w + b)))
    loss = float(-np.mean(y * np.log(p + 1e-9) + (1 - y) * np.log(1 - p + 1e-9)))
    return loss, float(np.mean((p > 0.5) == y))


@app.train()
def train(msg: Message, context: Context) -> Message:
    x, y, _, _ = load(context)
    w, b = (a.copy() for a in msg.content["arrays"].to_numpy_ndarrays())
    lr = float(context.run_config["learning-rate"])
    if w.shape[0] != x.shape[1]:  # the first round: the ServerApp does not know the features yet
        w = np.zeros(x.shape[1])
    for _ in range(int(context.run_config["local-epochs"])):
        p = 1 / (1 + np.exp(-(x @ w + b)))
        w -= lr * x.T @ (p - y) / len(y)
        b -= lr * np.array([np.mean(p - y)])
    loss, _ = _loss_acc(w, b, x, y)
    metrics = MetricRecord({{"train_loss": loss, "num-examples": len(y)}})
    return Message(RecordDict({{"arrays": ArrayRecord([w, b]), "metrics": metrics}}), reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    _, _, x, y = load(context)
    w, b = msg.content["arrays"].to_numpy_ndarrays()
    if w.shape[0] != x.shape[1]:
        w = np.zeros(x.shape[1])
    loss, acc = _loss_acc(w, b, x, y)
    metrics = MetricRecord({{"eval_loss": loss, "eval_acc": acc, "num-examples": len(y)}})
    return Message(RecordDict({{"metrics": metrics}}), reply_to=msg)
'''

TORCH_CLIENT = '''"""ClientApp (PyTorch API): a small MLP, trained on the site's data, which never leaves it."""

import torch
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from {module}.data import load
from {module}.model import Net

app = ClientApp()


def _tensors(context):
    x, y, xv, yv = load(context)
    as_x = lambda a: torch.tensor(a, dtype=torch.float32)  # noqa: E731
    return as_x(x), torch.tensor(y), as_x(xv), torch.tensor(yv)


@app.train()
def train(msg: Message, context: Context) -> Message:
    x, y, _, _ = _tensors(context)
    model = Net(x.shape[1])
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    optimizer = torch.optim.SGD(model.parameters(), lr=float(context.run_config["learning-rate"]))
    for _ in range(int(context.run_config["local-epochs"])):
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()
    metrics = MetricRecord({{"train_loss": float(loss), "num-examples": len(y)}})
    return Message(RecordDict({{"arrays": ArrayRecord(model.state_dict()), "metrics": metrics}}), reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    _, _, x, y = _tensors(context)
    model = Net(x.shape[1])
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    with torch.no_grad():
        logits = model(x)
        loss = float(torch.nn.functional.cross_entropy(logits, y))
        acc = float((logits.argmax(1) == y).float().mean())
    metrics = MetricRecord({{"eval_loss": loss, "eval_acc": acc, "num-examples": len(y)}})
    return Message(RecordDict({{"metrics": metrics}}), reply_to=msg)
'''

TORCH_MODEL = '''"""The model, the same at the coordinator and every site."""

import torch

FEATURES = 30  # the demo data's feature columns; change it to your data's


class Net(torch.nn.Module):
    def __init__(self, features: int = FEATURES, hidden: int = 16, classes: int = 2) -> None:
        super().__init__()
        self.layers = torch.nn.Sequential(torch.nn.Linear(features, hidden), torch.nn.ReLU(),
                                          torch.nn.Linear(hidden, classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)
'''

SERVER = '''"""ServerApp: Flower's FedAvg over every connected site, for num-server-rounds rounds."""

from flwr.app import ArrayRecord, ConfigRecord, Context
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

{initial_import}
app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    rounds = int(context.run_config["num-server-rounds"])
    strategy = FedAvg(fraction_train=1.0, fraction_evaluate=1.0)
    result = strategy.start(grid=grid, initial_arrays={initial}, num_rounds=rounds,
                            train_config=ConfigRecord({{}}), evaluate_config=ConfigRecord({{}}))
    print("final evaluation:", result.evaluate_metrics_clientapp.get(rounds))
'''

README = """# {name}: a Flower App

Made offline by `flowerbed app new` ({api} API). Each site trains on the CSV file its SuperNode
names (`data_path` in the kit's site.toml: a `target` column of class labels, numeric features);
nothing is downloaded.

    # at each site, in its kit folder (a site runs only what its data steward approved):
    flowerbed supernode approve PATH/TO/{name} --yes
    # at the coordinator:
    flowerbed run --app {name}

`flowerbed run --app` shows each round's aggregated metrics as they come. Settings are
`[tool.flwr.app.config]` in pyproject.toml, or `--app-config KEY=VALUE`.
"""


def new_app(folder: Path, name: str, api: Api = "numpy") -> Path:
    """Write the Flower App ``name`` into ``folder/NAME`` (refused if it exists); its path."""
    if not TASK_NAME.fullmatch(name):
        raise FlowerbedError(f"{name!r} is not an app name: use 2-41 lower-case letters, digits and hyphens")
    root = folder / name
    if root.exists():
        raise FlowerbedError(f"{root} already exists: choose another name or --dir")
    module = name.replace("-", "_")
    files = {
        "pyproject.toml": PYPROJECT.format(name=name, module=module, api=api,
                                           torch=', "torch"' if api == "pytorch" else ""),
        "README.md": README.format(name=name, api=api),
        f"{module}/__init__.py": "",
        f"{module}/data.py": DATA,
        f"{module}/client_app.py": (TORCH_CLIENT if api == "pytorch" else NUMPY_CLIENT).format(module=module),
        f"{module}/server_app.py": SERVER.format(
            initial_import=f"from {module}.model import Net\n" if api == "pytorch" else "import numpy as np\n",
            initial="ArrayRecord(Net().state_dict())" if api == "pytorch" else "ArrayRecord([np.zeros(1)] * 2)",
        ),
    }  # fmt: skip
    if api == "pytorch":
        files[f"{module}/model.py"] = TORCH_MODEL
    for relative, text in files.items():
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    return root
