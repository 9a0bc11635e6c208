"""The ClientApp: thin Flower handlers over :mod:`flowerbed.clientapp.task`.

Each train message carries the current global model; the ClientApp first evaluates it on the
site's validation split and reports that with its training result, so one message exchange per
round gives the ServerApp both (every exchange costs seconds in Flower, whatever the model).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr import clientapp as flower_clientapp
from flwr.app import ArrayRecord, ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters

from flowerbed import ckks, compression, wire
from flowerbed.audit import ROUND, TASK, append_here, head_of
from flowerbed.clientapp import ckks as site_ckks
from flowerbed.clientapp import compression as site_compression
from flowerbed.clientapp.data import DataError
from flowerbed.clientapp.privacy import (
    BudgetSpentError,
    PrivateTraining,
    effective_budget,
    ledger_folder,
    run_key,
    site_privacy,
)
from flowerbed.clientapp.secure import (
    POLICY_CODE,
    clipped,
    global_state,
    inspect_change,
    is_secure,
    make_secure_mod,
    secure_only_refusal,
)
from flowerbed.config import BASELINE_KEY, RunSettings, SiteKitConfig, load_toml_model
from flowerbed.datasummary import class_counts
from flowerbed.errors import FlowerbedError
from flowerbed.flower import compat
from flowerbed.heldout import HELD_OUT_KEY, TEST_PATH_KEY, bootstrap, split_off
from flowerbed.protocol import (
    APPROVED_AT,
    CKKS_KEYS_KEY,
    CKKS_PEERS,
    CKKS_RECORD,
    CKKS_WRAP_KEY,
    CLASS_COUNTS,
    CLASS_LABELS,
    FEATURE_STATS_KEY,
    FEATURE_SUMS,
    MAX_WEIGHT_KEY,
    PRIVACY_CODE,
    SITE_FILE_ENV,
    TRAIN_CONFIG,
    site_event,
    task_name,
)
from flowerbed.scaling import feature_sums, fit_scaling
from flowerbed.task import Task, check_metrics, imported_code, load_task, site_statistics, task_config

DATA_ERROR_CODE = 4001  # an application error code: the site's data path is missing or malformed


def _settings(context: Context) -> RunSettings:
    return RunSettings.from_run_config(dict(context.run_config))


def _site(context: Context) -> str:
    return str(context.node_config.get("site-name", f"node {context.node_id}"))


def _site_record(
    context: Context, audited: dict[str, Any] | None = None, classes: dict[int, int] | None = None
) -> ConfigRecord:
    """The site's name, so that the ServerApp's messages about this node name the site, and the head
    of the site's audit trail after this task (the coordinator's trail records it), and for an own task
    the digest of the files it was imported from (the code that ran here) and when this site approved
    it; ``classes``: the training split's class counts (the report's class balance)."""
    record = ConfigRecord({"site-name": _site(context), "audit-head": head_of(audited)})
    sha256 = _settings(context).task_sha256
    code = imported_code(sha256) if sha256 else None
    if code is not None:  # the files of the approved wheel this task was imported from: the code that ran here
        record["code-sha256"] = code.sha256
        approved = approved_at(sha256)
        if approved:
            record[APPROVED_AT] = approved
    if classes:
        record[CLASS_LABELS], record[CLASS_COUNTS] = list(classes), list(classes.values())
    return record


def approved_at(sha256: str) -> str:
    """When this site's data steward approved the task ``sha256`` (its site.toml; empty: not found)."""
    site_file = os.environ.get(SITE_FILE_ENV, "")
    if not site_file:
        return ""
    try:
        config = load_toml_model(Path(site_file), SiteKitConfig)
    except (OSError, FlowerbedError):
        return ""
    return next((a.approved_at for a in config.approved if a.kind == "task" and a.sha256 == sha256), "")


def update_digest(state: dict[str, Any]) -> tuple[int, str]:
    """Bytes and sha256 of a model update as it leaves the site (names and raw tensor bytes, in order)."""
    digest, size = hashlib.sha256(), 0
    for name, tensor in state.items():
        data = (
            tensor.detach().cpu().contiguous().numpy().tobytes()
            if isinstance(tensor, torch.Tensor)
            else tensor.tobytes()
        )
        digest.update(name.encode())
        digest.update(data)
        size += len(data)
    return size, digest.hexdigest()


def _task(context: Context) -> tuple[Task, Any]:
    """The run's task and its own settings (validated)."""
    settings = _settings(context)
    task = load_task(task_name(settings), settings.task_sha256)
    code = imported_code(settings.task_sha256) if settings.task_sha256 else None
    if code is not None and code.wheel_sha256 not in _RECORDED:  # once per task process
        _RECORDED.add(code.wheel_sha256)
        append_here(TASK, "clientapp", event="imported", task=task.name, task_sha256=code.wheel_sha256,
                    code_sha256=code.sha256, files=sorted(code.files))  # fmt: skip
    return task, task_config(task, dict(context.run_config))


_RECORDED: set[str] = set()  # wheels whose imported code this process has put into the site's trail


def _load(context: Context, task: Task, config: Any) -> tuple[Any, Any]:
    """The site's (train, validation) data, without its held-out test share (see :func:`_test_data`)."""
    data_path = str(context.node_config.get("data-path", ""))
    if not data_path:
        raise DataError("data-path is not set in the SuperNode's node config")
    train, validation = task.load_data(Path(data_path).expanduser(), config)
    settings = _settings(context)
    if settings.test_fraction > 0 and not context.node_config.get(TEST_PATH_KEY):
        validation, _ = split_off(validation, settings.test_fraction, settings.seed)
    return train, validation


def _test_data(context: Context, task: Task, config: Any) -> Any | None:
    """The site's held-out test data: its test_path (both splits load_data gives), else the run's
    test_fraction of its validation data; None when it has none."""
    from torch.utils.data import ConcatDataset

    test_path = str(context.node_config.get(TEST_PATH_KEY, ""))
    if test_path:
        return ConcatDataset(list(task.load_data(Path(test_path).expanduser(), config)))
    settings = _settings(context)
    if settings.test_fraction <= 0:
        return None
    data_path = Path(str(context.node_config.get("data-path", ""))).expanduser()
    _, validation = task.load_data(data_path, config)
    return split_off(validation, settings.test_fraction, settings.seed)[1]


def _held_out(context: Context, task: Task, config: Any, model: Any) -> MetricValues:
    """The final model on the site's test data: each metric with its 95% bootstrap interval, and for
    accuracy the count of correct predictions (the coordinator's pooled Wilson interval)."""
    test = _test_data(context, task, config)
    if test is None or len(test) == 0:
        return {"num-test": 0}

    def measure(data: Any) -> dict[str, float]:
        return check_metrics(task.evaluate(model, data, config), f"{task.name}.evaluate")

    point = measure(test)
    values: MetricValues = {"num-test": len(test)}
    for name, (lo, hi) in bootstrap(measure, test, _settings(context).seed).items():
        values |= {f"test-{name}-lo": lo, f"test-{name}-hi": hi}
    values |= _prefixed("test", point)
    return values


def _numpy_state(model: Any) -> dict[str, np.ndarray]:
    return {name: tensor.detach().cpu().numpy() for name, tensor in model.state_dict().items()}


def _received(msg: Message, task: Task, config: Any, key: Any, context: Context) -> tuple[Any, dict[str, Any]]:
    """The model to train and, under compression, the view it was made from (the base of the change sent)."""
    record = msg.content.config_records.get(compression.RECORD)
    if record is None:
        return _model(msg, task, config, key), {}
    model = task.model(config)  # compressed: the whole model, or int8's change from the view this site holds
    folder = site_compression.folder_of(dict(context.node_config))
    view = site_compression.receive(msg.content.array_records["arrays"], record, _numpy_state(model), folder,
                                    context.run_id)  # fmt: skip
    model.load_state_dict({name: torch.from_numpy(np.array(value)) for name, value in view.items()})
    return model, view


def _model(msg: Message, task: Task, config: Any, key: Any = None) -> Any:
    model = task.model(config)
    if is_secure(msg):  # SecAgg+ train instructions: Flower's legacy layout, the arrays in model order
        model.load_state_dict(global_state(msg, list(model.state_dict())))
    elif key is not None:  # CKKS: the global model decrypted here (round 1's initial model comes in the clear)
        model.load_state_dict(site_ckks.plain_state(key, msg.content.array_records["arrays"]))
    else:
        model.load_state_dict(msg.content.array_records["arrays"].to_torch_state_dict())
    return model


def _ckks_key(msg: Message, context: Context) -> Any:
    """The CKKS secret context of the message's model (None: not under CKKS); raises FlowerbedError."""
    return site_ckks.message_key(msg, site_ckks.he_dir(dict(context.node_config)), _site(context), context.run_id)


def _key_refusal(msg: Message, context: Context, exc: FlowerbedError) -> Message:
    site_event(f"round {_round(msg)}: {msg.metadata.message_type} task REFUSED: {exc.message}")
    return Message(Error(code=POLICY_CODE, reason=f"site {_site(context)}: {exc.message}"), reply_to=msg)


MetricValues = dict[str, int | float | list[int] | list[float]]


def _prefixed(prefix: str, metrics: dict[str, float]) -> MetricValues:
    return {f"{prefix}-{key}": value for key, value in metrics.items()}


def _summary(metrics: dict[str, float]) -> str:
    return ", ".join(f"{key} {value:.4f}" for key, value in metrics.items() if key != "loss") or "no metric"


def _config(msg: Message) -> ConfigRecord | None:
    """The instructions' config record (under SecAgg+ in Flower's legacy layout)."""
    records = msg.content.config_records
    return records.get("config") or records.get(TRAIN_CONFIG)


def _round(msg: Message) -> str:
    config = _config(msg)
    return str(config.get("server-round", "?")) if config is not None else "?"


def _error(msg: Message, context: Context, exc: DataError) -> Message:
    site_event(f"round {_round(msg)}: {msg.metadata.message_type} task FAILED on this site's data: {exc}")
    return Message(Error(code=DATA_ERROR_CODE, reason=f"site {_site(context)}: {exc}"), reply_to=msg)


def _private(msg: Message, context: Context, task: Task) -> PrivateTraining | None:
    """DP-SGD under the stricter of the site's budget and the run's request (None: neither asks)."""
    settings = _settings(context)
    budget = effective_budget(site_privacy(dict(context.node_config)), settings)
    if budget is None:
        return None
    if not callable(getattr(task, "train_private", None)):
        raise BudgetSpentError(
            f"site {_site(context)}: task {task.name} cannot train with DP-SGD (it has no train_private), and "
            f"this site trains only under {budget.describe()}: ask the task's authors to add train_private"
        )
    output_dir = str(context.run_config.get("output-dir", f"run-{context.run_id}"))
    return PrivateTraining(_site(context), budget, ledger_folder(dict(context.node_config)), run_key(output_dir),
                           context.run_id, int(_round(msg)), settings.max_rounds)  # fmt: skip


def _refuse(msg: Message, exc: BudgetSpentError) -> Message:
    site_event(f"round {_round(msg)}: train task REFUSED: {exc}")
    append_here(ROUND, "clientapp", run_id=msg.metadata.run_id, round=_round(msg), message="train", refused=str(exc))
    return Message(Error(code=PRIVACY_CODE, reason=str(exc)), reply_to=msg)


def count_examples(context: Context) -> int:
    """This site's number of training examples (its FedAvg weight), announced at SecAgg+'s setup."""
    task, config = _task(context)
    return len(_load(context, task, config)[0])


# Outermost: a packed message (flowerbed.wire) is unpacked for SecAgg+'s mod and the handlers, its reply packed.
app = flower_clientapp.ClientApp(mods=[wire.packing_mod, make_secure_mod(count_examples, _site)])


@app.train()
def train_handler(msg: Message, context: Context) -> Message:
    """Evaluate the received global model, train it locally, reply with weights and metrics."""
    site_event(f"round {_round(msg)}: received a train task")
    refusal = secure_only_refusal(msg, dict(context.node_config), _site(context))
    if refusal is not None:
        site_event(f"round {_round(msg)}: train task REFUSED: {refusal}")
        return Message(Error(code=POLICY_CODE, reason=refusal), reply_to=msg)
    task, config = _task(context)
    try:
        private = _private(msg, context, task)
        train_data, validation = _load(context, task, config)
    except DataError as exc:
        return _error(msg, context, exc)
    except BudgetSpentError as exc:
        return _refuse(msg, exc)
    try:
        key = _ckks_key(msg, context)
    except FlowerbedError as exc:
        return _key_refusal(msg, context, exc)
    try:
        model, view = _received(msg, task, config, key, context)
    except DataError as exc:
        return _error(msg, context, exc)
    secure = is_secure(msg)
    start = {name: tensor.detach().clone() for name, tensor in model.state_dict().items()} if secure else {}
    squeezed = msg.content.config_records.get(compression.RECORD)  # compression: the codec and the view's digest
    before = check_metrics(task.evaluate(model, validation, config), f"{task.name}.evaluate")
    sums = site_statistics(task, model, validation, config)  # of the global model, as ``before``
    label = _round(msg)
    server_round = int(label) if label.isdigit() else 0
    if "seed" in type(config).model_fields:  # a different shuffle each round, the same at a rerun
        config = config.model_copy(update={"seed": config.seed + server_round})
    try:
        result = (
            task.train(model, train_data, config)
            if private is None
            else task.train_private(  # type: ignore[attr-defined]
                model, train_data, config, private
            )
        )
    except BudgetSpentError as exc:
        return _refuse(msg, exc)
    trained = check_metrics(result, f"{task.name}.train")
    metrics = MetricRecord(_prefixed("train", trained) | _prefixed("eval", before) | {"num-examples": len(train_data)})
    state: dict[str, Any] = model.state_dict()
    masked = ""
    if secure:  # the change of the model goes to Flower's SecAgg+ mod, which masks it before it leaves
        state = {name: (tensor.detach() - start[name]).cpu().numpy() for name, tensor in state.items()}
        content = compat.fitres_to_recorddict(
            FitRes(Status(Code.OK, ""), ndarrays_to_parameters(list(state.values())), len(train_data), {}), False
        )
        content["metrics"] = metrics
        masked = _clipping_note(msg, context, list(state.values()), len(train_data))
        inspect_change(_site(context), server_round, state)
    elif key is not None:  # CKKS: only ciphertexts leave the site; the coordinator adds them without a key
        content = RecordDict({"arrays": site_ckks.encrypted(key, state), "metrics": metrics})
    elif squeezed is not None:  # compression: the change from the model received, fp16 or int8
        kind = str(squeezed.get("kind", ""))
        folder = site_compression.folder_of(dict(context.node_config))
        changed, record = site_compression.reply(_numpy_state(model), view, kind, folder, context.run_id)
        content = RecordDict({"arrays": changed, compression.RECORD: record, "metrics": metrics})
    else:
        content = RecordDict({"arrays": ArrayRecord(state), "metrics": metrics})
    if sums is not None:
        content["sums"] = _sums_record(sums)  # summed by the coordinator into the task's pooled metrics
    spent = ""
    if private is not None:
        if private.spent is None:  # nothing was reserved: the task trained without Opacus
            return _refuse(msg, BudgetSpentError(
                f"site {_site(context)}: task {task.name}'s train_private never called make_private, so it did "
                "not train with DP-SGD; its update is withheld"))  # fmt: skip
        content["privacy"] = ConfigRecord(private.record())
        spent = f"; DP-SGD: epsilon {private.spent:.3f} of {private.budget.epsilon:g} spent"
    if key is not None:
        size, sha256 = ckks.digest(ckks.from_record(content["arrays"])[1])
    elif squeezed is not None:  # what leaves the site: the compressed change
        size, sha256 = update_digest(compression.state_of(content.array_records["arrays"]))
    else:
        size, sha256 = update_digest(state)
    audited = append_here(ROUND, "clientapp", run_id=context.run_id, round=server_round, message="train",
                          update_bytes=size, update_sha256=sha256, examples=len(train_data),
                          epsilon=private.spent if private is not None else None)  # fmt: skip
    # The class balance of the training split, for the report; not under secure aggregation or DP, where
    # even the site's example count is masked or its release budgeted.
    classes = class_counts(train_data) if not secure and key is None and private is None else None
    content["site"] = _site_record(context, audited, classes)
    amount = f"{size / 1e6:.2f} MB" if size >= 1e6 else f"{size / 1e3:.1f} kB"
    sent = f"masks its update of {amount} (sha256 {sha256[:12]}) with SecAgg+{masked}" if secure else (
        f"sent its model encrypted with CKKS key {ckks.from_record(content['arrays'])[0].key_id}: {amount} of "
        f"ciphertext (sha256 {sha256[:12]}); the coordinator cannot read it" if key is not None else
        f"sent an update of {amount} (sha256 {sha256[:12]})")  # fmt: skip
    site_event(
        f"round {server_round}: trained on {len(train_data)} examples; the global model scored "
        f"{_summary(before)} on {len(validation)} local validation examples{spent}; {sent}"
    )
    return Message(content=content, reply_to=msg)


def _sums_record(sums: dict[str, float]) -> ConfigRecord:
    """The task's statistics as a record of their own kind: Flower's strategies take a reply's only
    MetricRecord as its metrics, so these travel as a ConfigRecord."""
    return ConfigRecord(dict(sums))


def _clipping_note(msg: Message, context: Context, change: list[np.ndarray], examples: int) -> str:
    """A warning when SecAgg+ will clip part of this site's update (its values exceed the range)."""
    config = _config(msg)
    weight = float(config.get(MAX_WEIGHT_KEY, 0.0)) if config is not None else 0.0  # type: ignore[arg-type]
    limit = _settings(context).secagg_clipping_range
    count = clipped(change, examples, weight, limit)
    if not count:
        return ""
    return (f" (WARNING: {count} value(s) of the weighted change exceed +-{limit:g} and are clipped: "
            "raise secagg_clipping_range or lower the learning rate)")  # fmt: skip


def local_baseline(task: Task, config: Any, train_data: Any, validation: Any, epochs: int) -> dict[str, float]:
    """Train a fresh model on this site's data alone for ``epochs`` epochs; its metrics on the validation
    split (the model never leaves the site, so no privacy budget is spent on it)."""
    model = task.model(config)
    fit_scaling(model, train_data)  # a local-only model standardizes with this site's own statistics
    if "local_epochs" in type(config).model_fields:
        task.train(model, train_data, config.model_copy(update={"local_epochs": epochs}))
    else:
        for _ in range(epochs):
            task.train(model, train_data, config)
    return check_metrics(task.evaluate(model, validation, config), f"{task.name}.evaluate")


@app.evaluate()
def evaluate_handler(msg: Message, context: Context) -> Message:
    """Evaluate the received global model on the site's validation split."""
    site_event(f"round {_round(msg)}: received an evaluate task")
    task, config = _task(context)
    try:
        train_data, validation = _load(context, task, config)
    except DataError as exc:
        return _error(msg, context, exc)
    try:
        key = _ckks_key(msg, context)
    except FlowerbedError as exc:
        return _key_refusal(msg, context, exc)
    model = _model(msg, task, config, key)
    config_record = _config(msg)
    if config_record is not None and config_record.get(HELD_OUT_KEY):  # the final model on the test data, once
        held = _held_out(context, task, config, model)
        site_event(f"round {_round(msg)}: the final model on {held['num-test']} held-out test examples")
        audited = append_here(ROUND, "clientapp", run_id=context.run_id, round=_round(msg), message="held-out test",
                              examples=held["num-test"])  # fmt: skip
        return Message(content=RecordDict({"metrics": MetricRecord(held), "site": _site_record(context, audited)}),
                       reply_to=msg)  # fmt: skip
    result = check_metrics(task.evaluate(model, validation, config), f"{task.name}.evaluate")
    sums = site_statistics(task, model, validation, config)
    site_event(f"round {_round(msg)}: evaluated the final model: {_summary(result)}")
    values = _prefixed("eval", result) | {"num-examples": len(validation)}
    epochs = int(str(config_record.get(BASELINE_KEY, 0))) if config_record is not None else 0
    if epochs > 0:
        local = local_baseline(task, config, train_data, validation, epochs)
        values |= _prefixed("local", local)
        site_event(f"round {_round(msg)}: a local-only model ({epochs} epochs, it stays here) scored {_summary(local)}")
    metrics = MetricRecord(values)
    audited = append_here(ROUND, "clientapp", run_id=context.run_id, round=_round(msg), message="evaluate",
                          metrics=sorted(result), examples=len(validation), local_baseline_epochs=epochs)  # fmt: skip
    content = RecordDict({"metrics": metrics, "site": _site_record(context, audited)})
    if sums is not None:
        content["sums"] = _sums_record(sums)
    return Message(content=content, reply_to=msg)


@app.query()
def query_handler(msg: Message, context: Context) -> Message:
    """The training split's per-feature count, sums and sums of squares, once before round 1 (federated
    feature standardization, :mod:`flowerbed.scaling`); a site that trains under DP sends none."""
    asked = msg.content.config_records.get("config")
    if asked is not None and (asked.get(CKKS_KEYS_KEY) or asked.get(CKKS_WRAP_KEY)):
        return _ckks_query(msg, context, asked)
    if asked is None or not asked.get(FEATURE_STATS_KEY):
        return Message(Error(code=DATA_ERROR_CODE, reason=f"site {_site(context)}: unknown query"), reply_to=msg)
    refusal = secure_only_refusal(msg, dict(context.node_config), _site(context))
    if refusal is not None:  # a site that trains only under secure aggregation sends nothing in the clear
        site_event(f"round 1: feature statistics REFUSED: {refusal}")
        return Message(Error(code=POLICY_CODE, reason=refusal), reply_to=msg)
    budget = effective_budget(site_privacy(dict(context.node_config)), _settings(context))
    if budget is not None:
        reason = (f"site {_site(context)} trains only under {budget.describe()}: it sends no feature statistics "
                  "(the run goes on without federated standardization)")  # fmt: skip
        site_event(f"round 1: feature statistics REFUSED: {reason}")
        return Message(Error(code=PRIVACY_CODE, reason=reason), reply_to=msg)
    task, config = _task(context)
    try:
        train_data, _ = _load(context, task, config)
        sums = feature_sums(train_data)
    except DataError as exc:
        return _error(msg, context, exc)
    except (ValueError, TypeError, RuntimeError) as exc:  # NaNs, or items that are no (features, label) pairs
        return _error(msg, context, DataError(f"its training data gives no feature statistics: {exc}"))
    audited = append_here(ROUND, "clientapp", run_id=context.run_id, round=0, message="feature statistics",
                          examples=sums.count, features=len(sums.sums))  # fmt: skip
    site_event(f"sent per-feature counts, sums and sums of squares of {sums.count} training examples "
               f"({len(sums.sums)} features) for federated standardization")  # fmt: skip
    content = RecordDict({FEATURE_SUMS: ConfigRecord(sums.record()), "site": _site_record(context, audited)})
    return Message(content=content, reply_to=msg)


def _ckks_query(msg: Message, context: Context, asked: ConfigRecord) -> Message:
    """CKKS keys before a round: this site's exchange key and the keys it holds, or the key wrapped for
    the sites named (made here when the run has none yet)."""
    folder = site_ckks.he_dir(dict(context.node_config))
    try:
        if asked.get(CKKS_KEYS_KEY):
            content = site_ckks.keys_reply(folder)
        else:
            record = msg.content.config_records.get(CKKS_RECORD) or ConfigRecord()
            content = site_ckks.wrap_reply(folder, _site(context), record, msg.content.array_records.get(CKKS_PEERS),
                                           context.run_id)  # fmt: skip
    except FlowerbedError as exc:
        return _key_refusal(msg, context, exc)
    content["site"] = ConfigRecord({"site-name": _site(context)})
    return Message(content=content, reply_to=msg)
