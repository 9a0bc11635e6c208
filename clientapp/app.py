"""The ClientApp: thin Flower handlers over :mod:`flowerbed.clientapp.task`.

Each train message carries the current global model; the ClientApp first evaluates it on the
site's validation split and reports that with its training result, so one message exchange per
round gives the ServerApp both (every exchange costs seconds in Flower, whatever the model).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from flowerbed.clientapp.builtin import task_name
from flowerbed.clientapp.data import DataError
from flowerbed.config import RunSettings
from flowerbed.supernode.events import site_event
from flowerbed.task import Task, check_metrics, load_task, task_config

DATA_ERROR_CODE = 4001  # an application error code: the site's data path is missing or malformed

app = ClientApp()


def _settings(context: Context) -> RunSettings:
    return RunSettings.from_run_config(dict(context.run_config))


def _site(context: Context) -> str:
    return str(context.node_config.get("site-name", f"node {context.node_id}"))


def _site_record(context: Context) -> ConfigRecord:
    """The site's name, so that the ServerApp's messages about this node name the site."""
    return ConfigRecord({"site-name": _site(context)})


def _task(context: Context) -> tuple[Task, Any]:
    """The run's task and its own settings (validated)."""
    settings = _settings(context)
    task = load_task(task_name(settings), settings.task_sha256)
    return task, task_config(task, dict(context.run_config))


def _load(context: Context, task: Task, config: Any) -> tuple[Any, Any]:
    data_path = str(context.node_config.get("data-path", ""))
    if not data_path:
        raise DataError("data-path is not set in the SuperNode's node config")
    return task.load_data(Path(data_path).expanduser(), config)


def _model(msg: Message, task: Task, config: Any) -> Any:
    model = task.model(config)
    arrays = msg.content.array_records["arrays"]
    model.load_state_dict(arrays.to_torch_state_dict())
    return model


MetricValues = dict[str, int | float | list[int] | list[float]]


def _prefixed(prefix: str, metrics: dict[str, float]) -> MetricValues:
    return {f"{prefix}-{key}": value for key, value in metrics.items()}


def _summary(metrics: dict[str, float]) -> str:
    return ", ".join(f"{key} {value:.4f}" for key, value in metrics.items() if key != "loss") or "no metric"


def _round(msg: Message) -> str:
    config = msg.content.config_records.get("config")
    return str(config.get("server-round", "?")) if config is not None else "?"


def _error(msg: Message, context: Context, exc: DataError) -> Message:
    site_event(f"round {_round(msg)}: {msg.metadata.message_type} task FAILED on this site's data: {exc}")
    return Message(Error(code=DATA_ERROR_CODE, reason=f"site {_site(context)}: {exc}"), reply_to=msg)


@app.train()
def train_handler(msg: Message, context: Context) -> Message:
    """Evaluate the received global model, train it locally, reply with weights and metrics."""
    site_event(f"round {_round(msg)}: received a train task")
    task, config = _task(context)
    try:
        train_data, validation = _load(context, task, config)
    except DataError as exc:
        return _error(msg, context, exc)
    model = _model(msg, task, config)
    before = check_metrics(task.evaluate(model, validation, config), f"{task.name}.evaluate")
    server_round = int(str(msg.content.config_records["config"].get("server-round", 0)))
    if "seed" in type(config).model_fields:  # a different shuffle each round, the same at a rerun
        config = config.model_copy(update={"seed": config.seed + server_round})
    trained = check_metrics(task.train(model, train_data, config), f"{task.name}.train")
    metrics = MetricRecord(_prefixed("train", trained) | _prefixed("eval", before) | {"num-examples": len(train_data)})
    site_event(
        f"round {server_round}: trained on {len(train_data)} examples; the global model scored "
        f"{_summary(before)} on {len(validation)} local validation examples"
    )
    content = RecordDict({"arrays": ArrayRecord(model.state_dict()), "metrics": metrics, "site": _site_record(context)})
    return Message(content=content, reply_to=msg)


@app.evaluate()
def evaluate_handler(msg: Message, context: Context) -> Message:
    """Evaluate the received global model on the site's validation split."""
    site_event(f"round {_round(msg)}: received an evaluate task")
    task, config = _task(context)
    try:
        _, validation = _load(context, task, config)
    except DataError as exc:
        return _error(msg, context, exc)
    result = check_metrics(task.evaluate(_model(msg, task, config), validation, config), f"{task.name}.evaluate")
    site_event(f"round {_round(msg)}: evaluated the final model: {_summary(result)}")
    metrics = MetricRecord(_prefixed("eval", result) | {"num-examples": len(validation)})
    return Message(content=RecordDict({"metrics": metrics, "site": _site_record(context)}), reply_to=msg)
