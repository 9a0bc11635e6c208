"""The ClientApp: thin Flower handlers over :mod:`flowerbed.clientapp.task`.

Each train message carries the current global model; the ClientApp first evaluates it on the
site's validation split and reports that with its training result, so one message exchange per
round gives the ServerApp both (every exchange costs seconds in Flower, whatever the model).
"""

from __future__ import annotations

import sys
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from flowerbed.clientapp.data import DataError, SiteData, load_site_data
from flowerbed.clientapp.task import evaluate, model_for, train
from flowerbed.config import RunSettings
from flowerbed.supernode.events import TASK_EVENT

DATA_ERROR_CODE = 4001  # an application error code: the site's data path is missing or malformed

app = ClientApp()


def _settings(context: Context) -> RunSettings:
    return RunSettings.from_run_config(dict(context.run_config))


def _site(context: Context) -> str:
    return str(context.node_config.get("site-name", f"node {context.node_id}"))


def _site_record(context: Context) -> ConfigRecord:
    """The site's name, so that the ServerApp's messages about this node name the site."""
    return ConfigRecord({"site-name": _site(context)})


def _load(context: Context, settings: RunSettings) -> SiteData:
    return load_site_data(
        str(context.node_config.get("data-path", "")),
        num_features=settings.num_features if settings.model == "mlp" else None,
        num_classes=settings.num_classes,
        class_names=settings.class_name_list(),
        image_size=settings.image_size,
        validation_fraction=settings.validation_fraction,
        seed=settings.seed,
    )


def _model(msg: Message, settings: RunSettings) -> Any:
    model = model_for(settings)
    arrays = msg.content.array_records["arrays"]
    model.load_state_dict(arrays.to_torch_state_dict())
    return model


def site_event(text: str) -> None:
    """A line for the site's own console: the SuperNode supervisor shows every ``flowerbed-task:`` line."""
    print(f"{TASK_EVENT} {text}", file=sys.stderr, flush=True)  # noqa: T201 - read by the supervisor


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
    settings = _settings(context)
    try:
        data = _load(context, settings)
    except DataError as exc:
        return _error(msg, context, exc)
    model = _model(msg, settings)
    before = evaluate(model, data.validation)
    server_round = int(str(msg.content.config_records["config"].get("server-round", 0)))
    train_loss = train(
        model,
        data.train,
        epochs=settings.local_epochs,
        batch_size=settings.batch_size,
        learning_rate=settings.learning_rate,
        proximal_mu=settings.proximal_mu,
        seed=settings.seed + server_round,
    )
    metrics = MetricRecord(
        {
            "train-loss": train_loss,
            "eval-loss": before.loss,
            "eval-accuracy": before.accuracy,
            "num-examples": data.num_train,
        }
    )
    site_event(
        f"round {server_round}: trained on {data.num_train} examples; the global model scored "
        f"accuracy {before.accuracy:.4f} on {before.num_examples} local validation examples"
    )
    content = RecordDict({"arrays": ArrayRecord(model.state_dict()), "metrics": metrics, "site": _site_record(context)})
    return Message(content=content, reply_to=msg)


@app.evaluate()
def evaluate_handler(msg: Message, context: Context) -> Message:
    """Evaluate the received global model on the site's validation split."""
    site_event(f"round {_round(msg)}: received an evaluate task")
    settings = _settings(context)
    try:
        data = _load(context, settings)
    except DataError as exc:
        return _error(msg, context, exc)
    result = evaluate(_model(msg, settings), data.validation)
    site_event(f"round {_round(msg)}: evaluated the final model: accuracy {result.accuracy:.4f}")
    metrics = MetricRecord(
        {"eval-loss": result.loss, "eval-accuracy": result.accuracy, "num-examples": result.num_examples}
    )
    return Message(content=RecordDict({"metrics": metrics, "site": _site_record(context)}), reply_to=msg)
