"""``flowerbed demo``: a whole TLS federation on this machine, then local vs federated vs central."""

from __future__ import annotations

import tempfile
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import ConcatDataset, TensorDataset

from flowerbed.certs import service
from flowerbed.clientapp.data import load_site_data, read_csv
from flowerbed.clientapp.task import evaluate, model_for, train
from flowerbed.config import FederationConfig, RunSettings, save_toml_model
from flowerbed.demodata import make_demo_data
from flowerbed.errors import FlowerbedError
from flowerbed.layout import FederationLayout
from flowerbed.probes import free_port
from flowerbed.runner import RunResult, check_result, follow, submit
from flowerbed.serverapp.history import FINAL_MODEL
from flowerbed.superlink.stack import CoordinatorStack, start_stack
from flowerbed.supernode.supervisor import SupernodeSpec, Supervisor

SITES = ["inst-a", "inst-b", "univ-hospital"]
Report = Callable[[str], None]


def demo_settings() -> RunSettings:
    """Run settings that converge on the demo data in a handful of rounds."""
    return RunSettings.model_validate(
        {
            "strategy": "fedavg",
            "max_rounds": 12,
            "min_nodes": 3,
            "target_metric": "accuracy",
            "target_value": 0.97,
            "patience": 3,
            "min_delta": 0.005,
            "time_budget_s": 200,
            "round_timeout_s": 120,
            "node_wait_s": 120,
            "local_epochs": 5,
            "batch_size": 32,
            "learning_rate": 0.01,
            "model": "mlp",
            "num_features": 30,
            "num_classes": 2,
            "hidden_units": 16,
        }
    )


def demo_config(gateway_port: int) -> FederationConfig:
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
            "sites": [{"name": s} for s in SITES],
            "run": demo_settings().model_dump(exclude_none=True),
        }
    )


@dataclass
class Comparison:
    """One row of the final table: a model evaluated on the held-out test set."""

    model: str
    train_examples: int
    accuracy: float
    loss: float


@dataclass
class DemoResult:
    work_dir: Path
    run: RunResult
    out_dir: Path
    comparisons: list[Comparison] = field(default_factory=list)


def _prefixed(report: Report, prefix: str) -> Report:
    return lambda message: report(f"[{prefix}] {message}")


@dataclass
class SiteThreads:
    """The three supervised SuperNodes, each in a thread of this process."""

    supervisors: list[Supervisor] = field(default_factory=list)
    threads: list[threading.Thread] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    stop_event: threading.Event = field(default_factory=threading.Event)

    def start(self, specs: list[SupernodeSpec], report: Report) -> None:
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

    def stop(self) -> None:
        self.stop_event.set()
        for thread in self.threads:
            thread.join(timeout=30)


def compare_models(
    settings: RunSettings, site_files: dict[str, Path], test_file: Path, federated: Path, epochs: int
) -> list[Comparison]:
    """Local-only models, the federated model and a centralized model on the same test set."""
    x_test, y_test = read_csv(test_file, settings.num_features)
    test = TensorDataset(torch.from_numpy(x_test), torch.from_numpy(y_test))

    def fresh() -> torch.nn.Module:
        torch.manual_seed(settings.seed)
        return model_for(settings)

    rows: list[Comparison] = []
    train_sets = []
    for site, path in site_files.items():
        data = load_site_data(
            str(path),
            num_features=settings.num_features,
            num_classes=settings.num_classes,
            image_size=settings.image_size,
            validation_fraction=settings.validation_fraction,
            seed=settings.seed,
        )
        train_sets.append(data.train)
        model = fresh()
        train(model, data.train, epochs=epochs, batch_size=settings.batch_size,
              learning_rate=settings.learning_rate, seed=settings.seed)  # fmt: skip
        res = evaluate(model, test)
        rows.append(Comparison(f"local only: {site}", data.num_train, res.accuracy, res.loss))
    model = fresh()
    model.load_state_dict(torch.load(federated, weights_only=True))
    res = evaluate(model, test)
    total = sum(len(t) for t in train_sets)
    rows.append(Comparison("federated (flowerbed)", total, res.accuracy, res.loss))
    pooled: ConcatDataset[tuple[torch.Tensor, ...]] = ConcatDataset(train_sets)
    model = fresh()
    train(model, pooled, epochs=epochs, batch_size=settings.batch_size,  # type: ignore[arg-type]
          learning_rate=settings.learning_rate, seed=settings.seed)  # fmt: skip
    res = evaluate(model, test)
    rows.append(Comparison("centralized (pooled data)", total, res.accuracy, res.loss))
    return rows


def run_demo(
    work_dir: Path | None = None,
    *,
    report: Report = lambda _m: None,
    on_rows: Callable[[list[dict[str, Any]]], None] = lambda _r: None,
    gateway_port: int | None = None,
) -> DemoResult:
    """Set up, run to convergence, compare, and stop every process (also on failure)."""
    root = Path(work_dir or tempfile.mkdtemp(prefix="flowerbed-demo-")).resolve()
    root.mkdir(parents=True, exist_ok=True)
    layout = FederationLayout(root / "federation")
    layout.root.mkdir(parents=True, exist_ok=True)
    config = demo_config(gateway_port or free_port())
    save_toml_model(layout.config, config)
    report(f"federation folder: {layout.root}")
    service.ensure_all(layout, config)
    report("made the CA, the gateway certificate and three node keys")
    data = make_demo_data(root / "site-data", SITES)
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
            )
            for s in SITES
        ]  # fmt: skip
        sites.start(specs, report)
        handle = submit(layout, config.run, name="demo")
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
    return DemoResult(work_dir=root, run=result, out_dir=handle.out_dir, comparisons=comparisons)
