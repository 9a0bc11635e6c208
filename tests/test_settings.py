"""A task's settings are the task's: its defaults hold unless the coordinator gives a value, and a run's
start shows every value with where it came from (task default, federation.toml, flag).

Real files and the real ``flowerbed`` command; the federated proof (a site trains with the task's
default) is in tests/test_taskpkg.py.
"""

from __future__ import annotations

import tomllib
from pathlib import Path

from pydantic import BaseModel

from flowerbed.config import SOURCES_KEY, RunSettings, Site, load_federation, save_toml_model
from flowerbed.errors import ExitCode
from flowerbed.task import effective_settings, load_task, task_config
from tests.conftest import assert_clean_error, run_cli


class OwnTask:
    """An own task whose defaults differ from the kit's run settings (3 epochs, batch 16, validation 0.25)."""

    name = "wine-study"

    class Config(BaseModel):
        local_epochs: int = 3
        batch_size: int = 16
        validation_fraction: float = 0.25
        dropout: float = 0.1

    def model(self, config: Config) -> None: ...
    def load_data(self, path: Path, config: Config) -> None: ...
    def train(self, model: object, data: object, config: Config) -> None: ...
    def evaluate(self, model: object, data: object, config: Config) -> None: ...


def test_an_own_tasks_defaults_hold_unless_given() -> None:
    task = OwnTask()
    untouched = RunSettings.model_validate({"max_rounds": 4})  # as federation.toml's [run] gives it
    config = task_config(task, untouched.to_run_config())  # type: ignore[arg-type]
    assert (config.local_epochs, config.batch_size, config.validation_fraction) == (3, 16, 0.25)  # type: ignore[attr-defined]

    given = RunSettings.model_validate({"local_epochs": 1, "task_settings": {"dropout": 0.5}})
    config = task_config(task, given.to_run_config())  # type: ignore[arg-type]
    assert (config.local_epochs, config.batch_size, config.dropout) == (1, 16, 0.5)  # type: ignore[attr-defined]

    # A run config from before the kit kept its sources: every value counts as given, as it did then.
    old = {k: v for k, v in untouched.to_run_config().items() if k != SOURCES_KEY}
    assert task_config(task, old).local_epochs == 1  # type: ignore[arg-type, attr-defined]

    # The sources travel with the run config (the manifest, Flower's flattened keys) and back.
    back = RunSettings.from_run_config(given.to_run_config())
    assert back.sources() == {"local_epochs": "federation.toml", "task_settings.dropout": "federation.toml"}


def test_the_effective_settings_name_their_sources() -> None:
    task = OwnTask()
    settings = RunSettings.model_validate({"max_rounds": 4, "learning_rate": 0.5}).with_sources(
        {"max_rounds": "federation.toml", "local_epochs": "flag", "learning_rate": "flag"}
    )
    settings = settings.model_copy(update={"local_epochs": 5})
    rows, unused = effective_settings(task, settings)  # type: ignore[arg-type]
    by_key = {row.key: (row.value, row.source) for row in rows}
    assert by_key["max_rounds"] == (4, "federation.toml")
    assert by_key["min_nodes"] == (2, "default")
    assert by_key["local_epochs"] == (5, "flag")
    assert by_key["batch_size"] == (16, "task default") and by_key["dropout"] == (0.1, "task default")
    assert unused == ["learning_rate"]  # given, but the task has no such setting: said, not silently dropped
    assert [row.key for row in rows][-4:] == ["local_epochs", "batch_size", "validation_fraction", "dropout"]

    builtin, unused = effective_settings(load_task("tabular"), RunSettings.model_validate({}))
    keys = [row.key for row in builtin]
    assert "num_features" in keys and "image_size" not in keys and not unused
    assert {row.source for row in builtin} == {"default"}


def test_init_writes_what_the_task_uses_and_every_port(tmp_path: Path) -> None:
    own = tmp_path / "own"
    made = run_cli("init", str(own), "--superlink-address", "link.example.org", "--site", "a", "--site", "b",
                   "--task", "wine-study", "--port", "9192")  # fmt: skip
    assert made.returncode == 0, made.stderr
    data = tomllib.loads((own / "federation.toml").read_text())
    assert data["run"] == {"task": "wine-study", "max_rounds": 20, "min_nodes": 2, "patience": 3,
                           "time_budget_s": 3600.0, "round_timeout_s": 300.0}  # no built-in task's keys  # fmt: skip
    link = data["superlink"]
    ports = (link["port"], link["internal_port"], data["supernode_port"], link["health_port"],
             link["executor_health_port"])  # fmt: skip
    assert ports == (9192, 9193, 9194, 9195, 9196)

    tab = tmp_path / "tab"
    made = run_cli("init", str(tab), "--superlink-address", "link.example.org", "--site", "a",
                   "--internal-port", "19000", "--supernode-port", "19001", "--gateway-host", "127.0.0.1")  # fmt: skip
    assert made.returncode == 0, made.stderr
    data = tomllib.loads((tab / "federation.toml").read_text())
    assert {"num_features", "num_classes", "local_epochs"} <= set(data["run"]) and "image_size" not in data["run"]
    assert data["superlink"]["internal_port"] == 19000 and data["supernode_port"] == 19001
    assert data["superlink"]["gateway_host"] == "127.0.0.1" and data["superlink"]["health_port"] == 9095

    clash = run_cli("init", str(tmp_path / "clash"), "--superlink-address", "x.org", "--site", "a",
                    "--supernode-port", "9093")  # fmt: skip
    assert_clean_error(clash, ExitCode.INVALID_CONFIG, "supernode_port 9093 is one of the coordinator's ports")

    # Writing the file again (a site added, revoked) keeps [run] to what was given.
    config = load_federation(own)
    config = config.model_copy(update={"sites": [*config.sites, Site(name="c")]})
    save_toml_model(own / "federation.toml", config)
    assert set(tomllib.loads((own / "federation.toml").read_text())["run"]) == {
        "task", "max_rounds", "min_nodes", "patience", "time_budget_s", "round_timeout_s"}  # fmt: skip


def test_a_runs_start_shows_each_setting_and_its_source(tmp_path: Path) -> None:
    """`flowerbed run` prints the settings table before it submits (here no SuperLink runs: then it stops)."""
    made = run_cli("task", "new", "ct-triage", "--dir", str(tmp_path))
    assert made.returncode == 0, made.stderr
    built = run_cli("task", "build", str(tmp_path / "ct-triage"), timeout=300)
    assert built.returncode == 0, built.stdout + built.stderr
    wheel = next(line.strip() for line in built.stdout.splitlines() if line.strip().endswith(".whl"))
    fed = tmp_path / "fed"
    made = run_cli("init", str(fed), "--superlink-address", "localhost", "--site", "a", "--site", "b",
                   "--task", "ct-triage", "--port", "39092")  # fmt: skip
    assert made.returncode == 0, made.stderr
    assert run_cli("certs", "init", "-d", str(fed)).returncode == 0

    result = run_cli("run", "-d", str(fed), "--task", wheel, "--batch-size", "8", "--task-setting", "seed=7",
                     "--learning-rate", "0.05")  # fmt: skip
    lines = [" ".join(line.replace("│", " ").split()) for line in result.stdout.splitlines()]
    assert "local_epochs 3 task default" in lines, result.stdout  # the template's default, not [run]'s 1
    assert "batch_size 8 flag" in lines and "seed 7 flag" in lines and "learning_rate 0.05 flag" in lines
    assert "max_rounds 20 federation.toml" in lines and "strategy fedavg default" in lines
    assert_clean_error(result, ExitCode.ERROR, "SuperLink")  # then refused: no coordinator runs here
    assert not (fed / "runs").exists() or not any((fed / "runs").iterdir())
