"""``flowerbed demo``: a whole TLS federation on this machine, then local vs federated vs central.

The default data set is scikit-learn's digits as label-skewed PNG folders at 5 sites (where
federation pays); ``--data breast-cancer`` is the tabular demo that is too easy to need it.
"""

from __future__ import annotations

import json
import tempfile
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import ConcatDataset, TensorDataset

from flowerbed.certs import service
from flowerbed.clientapp.data import read_csv, read_image_folders
from flowerbed.config import FederationConfig, RunSettings, save_toml_model
from flowerbed.demodata import make_demo_data, make_digits_data
from flowerbed.errors import FlowerbedError
from flowerbed.layout import FederationLayout
from flowerbed.probes import free_port
from flowerbed.protocol import task_name
from flowerbed.report import write_report
from flowerbed.runfolder import FINAL_MODEL
from flowerbed.runner import RunResult, check_result, follow, submit
from flowerbed.scaling import fit_scaling
from flowerbed.superlink.stack import CoordinatorStack, start_stack
from flowerbed.supernode.supervisor import SupernodeSpec, Supervisor
from flowerbed.task import effective_settings, load_task

Report = Callable[[str], None]
DATASETS = ("digits", "breast-cancer")
SITES = {
    "digits": ["inst-a", "inst-b", "inst-c", "inst-d", "univ-hospital"],
    "breast-cancer": ["inst-a", "inst-b", "univ-hospital"],
}
COMPARISON = "comparison.json"


def demo_settings(data: str = "digits") -> RunSettings:
    """The demo's recipe for ``data``: see docs/demo.md."""
    common = {"strategy": "fedavg", "round_timeout_s": 120, "node_wait_s": 120, "target_metric": "accuracy"}
    if data == "breast-cancer":  # converges on the (too easy) tabular demo in a handful of rounds
        recipe = {
            "max_rounds": 12, "min_nodes": 3, "target_value": 0.97, "patience": 3, "min_delta": 0.005,
            "time_budget_s": 200, "local_epochs": 5, "batch_size": 32, "learning_rate": 0.01, "model": "mlp",
            "num_features": 30, "num_classes": 2, "hidden_units": 16,
        }  # fmt: skip
    else:  # digits: MLP 64-64-10, SGD with momentum 0.9, lr 0.1, batch 16, 3 local epochs, up to 10 rounds
        recipe = {
            "task": "images", "model": "mlp", "image_size": 8, "image_channels": 1, "num_features": 64,
            "hidden_units": 64, "num_classes": 10, "class_names": ",".join(str(d) for d in range(10)),
            "optimizer": "sgd", "learning_rate": 0.1, "momentum": 0.9, "batch_size": 16, "local_epochs": 3,
            "max_rounds": 10, "min_nodes": 5, "patience": 10, "time_budget_s": 400,
        }  # fmt: skip
    return RunSettings.model_validate(common | recipe)


def demo_config(gateway_port: int, data: str = "digits") -> FederationConfig:
    """A federation on loopback with free ports (nothing fixed that could collide)."""
    return FederationConfig.model_validate(
        {
            "name": "demo",
            "superlink": {
                "address": "localhost",
                "sans": ["127.0.0.1"],
                "port": gateway_port,
                "gateway_host": "127.0.0.1",
                "internal_port": free_port(),
                "health_port": free_port(),
                "executor_health_port": free_port(),
            },
            "sites": [{"name": s} for s in SITES[data]],
            "run": demo_settings(data).model_dump(exclude_none=True),
        }
    )


@dataclass
class Comparison:
    """One row of the final table: a model evaluated on the held-out test set."""

    model: str  # "local only: SITE", "federated" or "centralized"
    train_examples: int
    accuracy: float
    loss: float

    def gap_points(self, federated: float) -> float | None:
        """How many accuracy points the federated model is ahead of this one (None for itself)."""
        return None if self.model == FEDERATED else round((federated - self.accuracy) * 100, 1)


FEDERATED, CENTRALIZED = "federated", "centralized"


@dataclass
class DemoResult:
    """What the demo made: its folder, the federated run and the comparison."""

    work_dir: Path
    run: RunResult
    out_dir: Path
    comparisons: list[Comparison] = field(default_factory=list)


def _prefixed(report: Report, prefix: str) -> Report:
    return lambda message: report(f"[{prefix}] {message}")


@dataclass
class SiteThreads:
    """The demo's supervised SuperNodes, each in a thread of this process."""

    supervisors: list[Supervisor] = field(default_factory=list)
    threads: list[threading.Thread] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    stop_event: threading.Event = field(default_factory=threading.Event)

    def start(self, specs: list[SupernodeSpec], report: Report) -> None:
        """Start a supervised SuperNode per spec, each in a thread."""
        for spec in specs:
            sup = Supervisor(spec, report=_prefixed(report, spec.site))
            self.supervisors.append(sup)
            thread = threading.Thread(target=self._run, args=(sup,), name=spec.site, daemon=True)
            self.threads.append(thread)
            thread.start()

    def _run(self, sup: Supervisor) -> None:
        try:
            sup.run(self.stop_event.is_set)
        except FlowerbedError as exc:
            self.errors.append(f"{sup.spec.site}: {exc.message}")
        except Exception as exc:  # noqa: BLE001 - a thread that dies silently would leave the run waiting
            self.errors.append(f"{sup.spec.site}: the supervisor failed: {type(exc).__name__}: {exc}")

    def stop(self) -> None:
        """Stop every supervisor and wait for its thread."""
        self.stop_event.set()
        for thread in self.threads:
            thread.join(timeout=30)


def test_set(settings: RunSettings, path: Path) -> TensorDataset:
    """The held-out test set, whole (a CSV file or a folder of class folders)."""
    if path.is_dir():
        names = settings.class_name_list()
        x, y, _ = read_image_folders(path, settings.image_size, num_classes=settings.num_classes, class_names=names,
                                     channels=settings.image_channels)  # fmt: skip
    else:
        x, y = read_csv(path, settings.num_features)
    return TensorDataset(torch.from_numpy(x), torch.from_numpy(y))


def compare_models(
    settings: RunSettings, site_files: dict[str, Path], test_path: Path, federated: Path, epochs: int
) -> list[Comparison]:
    """Local-only models, the federated model and a centralized model on the same test set.

    Every model is the run's task, trained as the sites train it; local-only and centralized get
    as many epochs as the federated model's whole run.
    """
    task = load_task(task_name(settings))
    test = test_set(settings, test_path)
    longer = settings.model_copy(update={"local_epochs": epochs})

    def fresh() -> torch.nn.Module:
        torch.manual_seed(settings.seed)
        return task.model(settings)

    def scored(name: str, model: torch.nn.Module, examples: int) -> Comparison:
        metrics = task.evaluate(model, test, settings)
        return Comparison(name, examples, metrics["accuracy"], metrics["loss"])

    rows: list[Comparison] = []
    train_sets: list[TensorDataset] = []
    for site, path in site_files.items():
        train_data, _ = task.load_data(path, settings)
        train_sets.append(train_data)  # type: ignore[arg-type]
        model = fresh()
        fit_scaling(model, train_data)  # a model of one site's data standardizes with that site's statistics
        task.train(model, train_data, longer)
        rows.append(scored(f"local only: {site}", model, len(train_sets[-1])))
    total = sum(len(t) for t in train_sets)
    model = fresh()
    model.load_state_dict(torch.load(federated, weights_only=True))
    rows.append(scored(FEDERATED, model, total))
    model, pooled = fresh(), ConcatDataset[Any](train_sets)
    fit_scaling(model, pooled)
    task.train(model, pooled, longer)
    rows.append(scored(CENTRALIZED, model, total))
    return rows


def write_comparison(rows: list[Comparison], path: Path) -> None:
    """``comparison.json``: the final table as a list of rows (model, accuracy, train examples, gap)."""
    federated = next(r.accuracy for r in rows if r.model == FEDERATED)
    data = [{"model": r.model, "accuracy": r.accuracy, "loss": r.loss, "train_examples": r.train_examples,
             "gap_to_federated_points": r.gap_points(federated)} for r in rows]  # fmt: skip
    path.write_text(json.dumps(data, indent=1), encoding="utf-8")


def run_demo(
    work_dir: Path | None = None,
    *,
    report: Report = lambda _m: None,
    on_rows: Callable[[list[dict[str, Any]]], None] = lambda _r: None,
    gateway_port: int | None = None,
    data_set: str = "digits",
) -> DemoResult:
    """Set up, run to convergence, compare, and stop every process (also on failure)."""
    if data_set not in DATASETS:
        raise FlowerbedError(f"no demo data set {data_set!r}: use {' or '.join(DATASETS)}")
    sites_of = SITES[data_set]
    root = Path(work_dir or tempfile.mkdtemp(prefix="flowerbed-demo-")).resolve()
    root.mkdir(parents=True, exist_ok=True)
    layout = FederationLayout(root / "federation")
    layout.root.mkdir(parents=True, exist_ok=True)
    config = demo_config(gateway_port or free_port(), data_set)
    save_toml_model(layout.config, config)
    report(f"federation folder: {layout.root}")
    service.ensure_all(layout, config)
    report(f"made the CA, the gateway certificate and {len(sites_of)} node keys")
    if data_set == "digits":
        data = make_digits_data(root / "site-data", sites_of)
        report("made label-skewed PNG image folders for 5 sites from scikit-learn's digits (offline)")
    else:
        data = make_demo_data(root / "site-data", sites_of)
        report("made non-IID demo data from scikit-learn's breast cancer set (offline)")
    stack: CoordinatorStack | None = None
    sites = SiteThreads()
    try:
        stack = start_stack(layout, config, report=report)
        address = f"{config.superlink.address}:{config.superlink.port}"
        specs = [
            SupernodeSpec(
                site=s, superlink=address, ca=layout.ca_cert, key=layout.node_key(s),
                data=data.site_files[s], workdir=root / "sites" / s, port=free_port(),
                threads=1,  # the sites share this host
            )
            for s in sites_of
        ]  # fmt: skip
        sites.start(specs, report)
        effective, _ = effective_settings(load_task(task_name(config.run)), config.run)
        handle = submit(layout, config.run, name="demo", effective=effective)
        report(f"submitted run {handle.run_id}; output: {handle.out_dir}")

        def rows_and_check(rows: list[dict[str, Any]]) -> None:
            if sites.errors:
                raise FlowerbedError(f"a SuperNode stopped: {sites.errors[0]}")
            on_rows(rows)

        result = follow(layout, handle, on_rows=rows_and_check, timeout_s=config.run.time_budget_s + 120)
        check_result(result, handle)
    finally:
        sites.stop()
        if stack is not None:
            stack.stop()
    epochs = len(result.rows) * config.run.local_epochs
    comparisons = compare_models(config.run, data.site_files, data.test_file, handle.out_dir / FINAL_MODEL, epochs)
    write_comparison(comparisons, handle.out_dir / COMPARISON)
    write_report(layout, handle.out_dir.name)
    return DemoResult(work_dir=root, run=result, out_dir=handle.out_dir, comparisons=comparisons)
