"""Pydantic models for ``federation.toml`` and the run settings, with load/save helpers."""

from __future__ import annotations

import ipaddress
import re
import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

import tomli_w
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator, model_validator

from flowerbed.errors import ExitCode, FlowerbedError

FEDERATION_FILE = "federation.toml"
SITE_FILE = "site.toml"
BASELINE_KEY = "local-baseline-epochs"  # final evaluate message: train a local-only model this long first
SOURCES_KEY = "settings-from"  # run-config key: the settings given (federation.toml, a flag), as KEY:SOURCE,...
FROM_FILE = "federation.toml"
FROM_FLAG = "flag"
FROM_TASK = "task default"
FROM_DEFAULT = "default"
# The run settings every task uses (the loop's), and those the built-in tasks add: what `init` writes
# into [run] and what a run's start shows.
LOOP_KEYS = ("strategy", "max_rounds", "min_nodes", "target_metric", "target_value", "patience", "time_budget_s",
             "round_timeout_s", "dp", "secure_aggregation")  # fmt: skip
TABULAR_KEYS = ("num_features", "num_classes", "hidden_units", "standardize_features", "local_epochs", "batch_size",
                "learning_rate", "optimizer", "validation_fraction", "seed")  # fmt: skip
IMAGE_KEYS = ("model", "image_size", "image_channels", "num_classes", "class_names", "local_epochs", "batch_size",
              "learning_rate", "optimizer", "validation_fraction", "seed")  # fmt: skip
DATA_PLACEHOLDER = "CHANGE-ME: /path/to/your/data.csv or image folder"
NAME_RE = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")
TASK_NAME = re.compile(r"[a-z][a-z0-9-]{1,40}")  # a task's name (`flowerbed task new`, run.task)
HOST_RE = re.compile(
    r"^(?=.{1,253}$)([A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*$"
)

M = TypeVar("M", bound=BaseModel)
Port = Annotated[int, Field(ge=1, le=65535)]
Strategy = Literal["fedavg", "fedprox", "fedadam", "fedmedian"]


def is_ip(value: str) -> bool:
    """True when ``value`` is an IPv4 or IPv6 address."""
    try:
        ipaddress.ip_address(value)
    except ValueError:
        return False
    return True


def check_name(value: str, what: str) -> str:
    """Accept a site or federation name: lower-case letters, digits and hyphens."""
    if not NAME_RE.match(value):
        raise ValueError(
            f"{what} name {value!r} must be lower-case letters, digits and hyphens, "
            "starting with a letter or digit (at most 63 characters)"
        )
    return value


def check_host(value: str) -> str:
    """Accept a DNS name or an IP address, refuse anything else."""
    value = value.strip()
    if not (is_ip(value) or HOST_RE.match(value)):
        raise ValueError(f"{value!r} is neither a DNS name nor an IP address")
    return value


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class SuperLinkSettings(_Model):
    """Where the SuperLink is reached and which local ports it uses on the coordinator host."""

    address: str = Field(description="Public DNS name or IP the SuperNodes connect to")
    sans: list[str] = Field(default_factory=list, description="Extra names/IPs for the certificate")
    port: Port = Field(9092, description="Public port of the Fleet gateway (nginx)")
    gateway_host: str = Field("0.0.0.0", description="Address the gateway listens on")  # noqa: S104
    internal_port: Port = Field(9093, description="Loopback port of flower-superlink")
    health_port: Port = Field(9095, description="Loopback port of the SuperLink health service")
    executor_health_port: Port = Field(9096, description="Loopback port of the executor's health service")
    idle_timeout_s: int = Field(
        60, ge=1, le=200, description="Gateway closes idle site connections after this (below Azure's 240 s cut)"
    )

    @field_validator("address", "gateway_host")
    @classmethod
    def _host(cls, value: str) -> str:
        return check_host(value)

    @field_validator("sans")
    @classmethod
    def _sans(cls, value: list[str]) -> list[str]:
        return [check_host(v) for v in value]

    @model_validator(mode="after")
    def _distinct_ports(self) -> SuperLinkSettings:
        ports = [self.port, self.internal_port, self.health_port, self.executor_health_port]
        if len(set(ports)) != len(ports):
            raise ValueError(f"port, internal_port, health_port and executor_health_port must differ, got {ports}")
        return self

    def all_sans(self) -> list[str]:
        """The public address followed by every extra SAN, without duplicates."""
        out: list[str] = []
        for name in [self.address, *self.sans]:
            if name not in out:
                out.append(name)
        return out


ARCHIVE_OF_PLATFORM = {"linux": "tar.gz", "macos": "tar.gz", "windows": "zip"}


class Site(_Model):
    """One participating institution."""

    name: str
    platform: Literal["linux", "windows", "macos"] = Field(
        "linux", description="The site VM's system: its kit is a .zip on windows, a .tar.gz elsewhere"
    )

    @property
    def archive_format(self) -> str:
        """The kit archive this site unpacks with its system's own tools: ``tar.gz`` or ``zip``."""
        return ARCHIVE_OF_PLATFORM[self.platform]

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        return check_name(value, "site")


class RunSettings(_Model):
    """Run defaults: strategy, convergence criteria and local training settings."""

    task: str = Field(
        "", description="The task (model, data, training, metrics) by name; empty: the built-in task of `model`"
    )
    task_sha256: str = Field("", description="sha256 of the own task's wheel (`flowerbed run --task WHEEL` sets it)")
    task_settings: dict[str, str | int | float | bool] = Field(
        default_factory=dict, description="The own task's settings, by the names of its Config ([run.task_settings])"
    )
    strategy: Strategy = "fedavg"
    max_rounds: int = Field(20, ge=1, le=10000)
    min_nodes: int = Field(2, ge=1)
    target_metric: str = Field("accuracy", description="Any metric the task's evaluate reports, e.g. auroc")
    target_mode: Literal["auto", "max", "min"] = Field("auto", description="auto: min for *loss, else max")
    target_value: float | None = Field(None, description="Stop when the eval metric reaches it")
    patience: int = Field(3, ge=1, description="Rounds without eval-loss improvement before stop")
    min_delta: float = Field(1e-3, ge=0)
    time_budget_s: float = Field(3600, gt=0)
    round_timeout_s: float = Field(300, gt=0)
    node_wait_s: float = Field(300, gt=0, description="How long to wait for min_nodes to connect")
    site_absence_tolerance_s: float = Field(
        600, ge=0, description="How long a round short of min_nodes waits for absent sites before the run fails"
    )
    absence_retry_s: float = Field(15, gt=0, description="Pause before a round short of absent sites is retried")
    max_update_norm: float | None = Field(
        None, gt=0, description="Drop a site's update whose change to the global model has a larger L2 norm"
    )
    keep_checkpoints: int = Field(3, ge=0, description="Round checkpoints kept (the last N); best.pt is always kept")
    local_epochs: int = Field(1, ge=1)
    batch_size: int = Field(32, ge=1)
    learning_rate: float = Field(0.01, gt=0)
    optimizer: Literal["adam", "sgd"] = Field("adam", description="Local optimizer of the built-in tasks")
    momentum: float = Field(0.9, ge=0, lt=1, description="SGD momentum (optimizer = sgd)")
    proximal_mu: float = Field(0.0, ge=0)
    server_learning_rate: float = Field(0.1, gt=0, description="FedAdam eta")
    model: Literal["mlp", "cnn"] = "mlp"
    num_features: int = Field(30, ge=1, description="CSV feature columns (mlp)")
    num_classes: int = Field(2, ge=2)
    image_size: int = Field(32, ge=8, le=512, description="Side of resized images")
    image_channels: Literal[1, 3] = Field(3, description="1: images are read as grayscale, 3: as RGB")
    class_names: str = Field(
        "", description="Image classes in label order, comma-separated (default: sorted folder names)"
    )
    hidden_units: int = Field(32, ge=1)
    standardize_features: bool = Field(
        True,
        description="Before round 1 the sites' per-feature counts, sums and sums of squares give the global "
        "mean and standard deviation the model standardizes with (the tabular task, or an own task whose "
        "model has a FeatureScaling layer; off under secure aggregation and DP)",
    )
    validation_fraction: float = Field(0.2, gt=0, lt=1)
    seed: int = 42
    held_out_test: bool = Field(
        False,
        description="At the end, the final model is evaluated on each site's held-out test data (site.toml "
        "test_path, or test_fraction), with 95% intervals per site and pooled",
    )
    test_fraction: float = Field(
        0.0,
        ge=0,
        lt=1,
        description="A share of each site's validation data held out as its test data (never "
        "trained on, never used to choose the model); > 0 turns held_out_test on",
    )
    local_baseline: bool = Field(
        False, description="Each site also trains a local-only model at the end and reports only its metrics"
    )
    dp: Literal["off", "sample", "client"] = Field(
        "off",
        description="sample: DP-SGD at every site (a site's own [privacy] budget can only be stricter); "
        "client: Flower's client-level DP at the server (costs much accuracy with fewer than ~20 sites)",
    )
    dp_epsilon: float = Field(
        8.0, gt=0, description="dp = sample: the run's epsilon per site (the stricter of this and the site's)"
    )
    dp_delta: float = Field(1e-5, gt=0, lt=1, description="dp = sample: the run's delta per site")
    dp_max_grad_norm: float = Field(
        1.0, gt=0, description="dp: clipping norm (per example for sample, per update for client)"
    )
    dp_noise_multiplier: float = Field(1.0, gt=0, description="dp = client: Gaussian noise multiplier at the server")
    secure_aggregation: Literal["off", "secagg+", "ckks"] = Field(
        "off",
        description="secagg+: Flower's SecAgg+ masks every update; the ServerApp learns only their weighted sum. "
        "ckks: the sites encrypt their models under a key only they hold and the ServerApp adds ciphertexts; "
        "it never holds an update, an aggregate or a model in the clear (metrics stay in the clear)",
    )
    secagg_threshold: float = Field(
        0.67, gt=0, le=1, description="secagg+: share of a site's key shares needed to unmask (at least 2 shares)"
    )
    secagg_clipping_range: float = Field(
        8.0, gt=0, description="secagg+: each weighted update value is clipped to +-this before quantization"
    )
    compression: Literal["none", "fp16", "int8"] = Field(
        "none",
        description="fp16/int8: sites send their change in half precision / as int8 with a scale per row (the "
        "rounding's loss carried to the next round), and the model comes back in the same form",
    )
    broadcast_fp32: bool = Field(
        False, description="compression: the coordinator broadcasts the global model in fp32 (updates stay compressed)"
    )
    secagg_inspect: str = Field(
        "",
        description="secagg+/ckks: a folder on the coordinator for all the ServerApp received of the updates (audits)",
    )

    _sources: dict[str, str] | None = PrivateAttr(default=None)

    @model_validator(mode="after")
    def _consistent(self) -> RunSettings:
        if self.strategy == "fedprox" and self.proximal_mu <= 0:
            raise ValueError("strategy 'fedprox' needs proximal_mu > 0 (e.g. 0.1)")
        if self.secure_aggregation != "off":
            if self.strategy not in ("fedavg", "fedprox"):
                raise ValueError(
                    f"secure_aggregation = {self.secure_aggregation!r} gives the server only the sites' weighted "
                    f"mean: strategy {self.strategy!r} needs each update; use fedavg or fedprox"
                )
            if self.dp == "client":
                raise ValueError(
                    "secure_aggregation hides each update, which dp = client clips at the server: "
                    "use dp = sample (DP-SGD at each site) with secure aggregation"
                )
            if self.min_nodes < 2:
                raise ValueError("secure_aggregation needs min_nodes >= 2 (the sum of one update is that update)")
            if self.compression != "none":
                raise ValueError(
                    f"compression = {self.compression!r} with secure_aggregation = {self.secure_aggregation!r}: "
                    "SecAgg+'s integer masking and CKKS's encoding quantize on their own; use compression = 'none'"
                )
        names = self.class_name_list()
        if names is not None and (len(names) != self.num_classes or len(set(names)) != len(names)):
            raise ValueError(f"class_names must list num_classes={self.num_classes} distinct names, got {names}")
        target = self.target_value
        if target is not None and self.target_metric == "accuracy" and not 0 < target <= 1:
            raise ValueError("target_value for accuracy must be in (0, 1]")
        return self

    @field_validator("task_sha256")
    @classmethod
    def _sha(cls, value: str) -> str:
        if value and not re.fullmatch(r"[0-9a-f]{64}", value):
            raise ValueError(f"{value!r} is not a sha256 (64 hex digits, as `flowerbed task build` prints)")
        return value

    @field_validator("task")
    @classmethod
    def _task_name(cls, value: str) -> str:
        if value and not TASK_NAME.fullmatch(value):
            raise ValueError(f"{value!r} is not a task name (lower-case letters, digits and hyphens)")
        return value

    @field_validator("target_metric")
    @classmethod
    def _metric_name(cls, value: str) -> str:
        if not re.fullmatch(r"[A-Za-z][A-Za-z0-9_-]{0,63}", value):
            raise ValueError(f"{value!r} is not a metric name (letters, digits, - and _; e.g. auroc)")
        return value

    def held_out(self) -> bool:
        """True when the run ends with a held-out test of its final model."""
        return self.held_out_test or self.test_fraction > 0

    def target_direction(self) -> str:
        """``max`` when a higher ``target_metric`` is better, ``min`` when lower is (``*loss`` in auto mode)."""
        if self.target_mode != "auto":
            return self.target_mode
        return "min" if self.target_metric.endswith("loss") else "max"

    def class_name_list(self) -> list[str] | None:
        """``class_names`` as a list (None when not set)."""
        names = [n.strip() for n in self.class_names.split(",") if n.strip()]
        return names or None

    def sources(self) -> dict[str, str]:
        """Where each setting given came from (``FROM_FILE``, ``FROM_FLAG``), by field name; an own task's
        settings as ``task_settings.KEY``. Settings not in it are defaults: the task's own, else the kit's.

        Without sources attached (:meth:`with_sources`), the fields set when the model was made
        (those in federation.toml's [run]) count as given in federation.toml.
        """
        if self._sources is not None:
            return dict(self._sources)
        given = {key: FROM_FILE for key in self.model_fields_set if key != "task_settings"}
        return given | {f"task_settings.{key}": FROM_FILE for key in self.task_settings}

    def with_sources(self, sources: dict[str, str]) -> RunSettings:
        """A copy that says where its settings came from (see :meth:`sources`)."""
        copy = self.model_copy()
        copy._sources = dict(sources)
        return copy

    def to_run_config(self) -> dict[str, Any]:
        """Flower run-config (kebab-case keys; ``None`` values and empty task settings are left out).

        ``task_settings`` is a table, which Flower flattens to ``task-settings.KEY`` keys;
        ``SOURCES_KEY`` says which settings were given, so that an own task's defaults hold for the rest.
        """
        out: dict[str, Any] = {}
        for key, value in self.model_dump().items():
            if value is not None and value != {}:
                out[key.replace("_", "-")] = value
        out[SOURCES_KEY] = ",".join(f"{k.replace('_', '-')}:{v}" for k, v in sorted(self.sources().items()))
        return out

    @classmethod
    def from_run_config(cls, config: dict[str, Any]) -> RunSettings:
        """Inverse of :meth:`to_run_config` (flattened by Flower or not); unknown keys are ignored."""
        known = set(cls.model_fields) - {"task_settings"}
        data = {k.replace("-", "_"): v for k, v in config.items() if "." not in k}
        settings = cls.model_validate(
            {k: v for k, v in data.items() if k in known} | {"task_settings": task_settings_of(config)}
        )
        given = given_settings(config)
        return settings if given is None else settings.with_sources(given)


def given_settings(config: dict[str, Any]) -> dict[str, str] | None:
    """The settings a run config says were given, field name -> source (None: it does not say, as
    in runs submitted before flowerbed kept it; then every value counts as given)."""
    text = config.get(SOURCES_KEY)
    if not isinstance(text, str):
        return None
    pairs = (item.partition(":") for item in text.split(",") if item)
    return {key.replace("-", "_"): source for key, _, source in pairs}


def task_settings_of(config: dict[str, Any]) -> dict[str, Any]:
    """The own task's settings in a run config: a ``task-settings`` table, or Flower's flattened keys."""
    own = dict(config.get("task-settings") or config.get("task_settings") or {})
    for key, value in config.items():
        head, dot, rest = key.partition(".")
        if dot and head in ("task-settings", "task_settings"):
            own[rest] = value
    return own


class Approval(_Model):
    """One task wheel or Flower App that a site's data steward approved (``[[approved]]`` in site.toml)."""

    kind: Literal["task", "app"]
    name: str = Field(description="The task's name, or the app's project name")
    version: str
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    file: str = Field("", description="The approved wheel, relative to the kit (tasks are imported from it)")
    requires: list[str] = Field(default_factory=list, description="Its dependencies, as shown when approved")
    approved_at: str = ""


class SitePrivacy(_Model):
    """``[privacy]`` in site.toml: the site's differential-privacy budget, which only the site sets."""

    epsilon: float = Field(gt=0, le=100, description="The most epsilon this site spends (per run, or in all runs)")
    delta: float = Field(1e-5, gt=0, lt=1, description="delta of the (epsilon, delta) guarantee; below 1/examples")
    max_grad_norm: float = Field(1.0, gt=0, description="Per-example gradient clipping norm of DP-SGD")
    noise_multiplier: float | None = Field(
        None, gt=0, description="Fixed DP-SGD noise; unset: the least noise that lasts the run's max_rounds"
    )
    accountant: Literal["rdp", "prv"] = Field("rdp", description="Opacus accountant that counts the spending")
    scope: Literal["run", "site"] = Field("run", description="run: a budget per run; site: one budget for all runs")


class SiteKitConfig(_Model):
    """The content of a site kit's ``site.toml``."""

    federation: str
    site: str
    superlink_address: str
    superlink_port: Port = 9092
    data_path: str = Field(DATA_PLACEHOLDER, description="CSV file or folder of class folders")
    test_path: str = Field(
        "",
        description="Held-out test data in load_data's format (relative to the kit): never trained on; only the "
        "final model of a run with held_out_test is evaluated on it",
    )
    workdir: str = Field("supernode-work", description="Logs and Flower state, relative to the kit")
    supernode_port: Port = Field(9094, description="Loopback port of the SuperNode's local API")
    allow_builtin_tasks: bool = Field(True, description="Runs of flowerbed's built-in tasks need no approval")
    executor: Literal["warm", "subprocess"] = Field(
        "warm", description="warm: each task is a fork of a process that imported torch once; subprocess: Flower's"
    )
    torch_threads: int = Field(0, ge=0, description="torch threads per task; 0: all of this VM's cores")
    device: str = Field(
        "auto", description='Where tasks train: "auto" (the GPU if torch sees one), "cpu", "cuda" or "cuda:N"'
    )
    pull_s: float = Field(
        0.25, ge=0.05, le=3, description="After a reply, ask for the next task this often (3: Flower's own 3 s)"
    )
    require_secure_aggregation: bool = Field(
        False, description="true: this site trains only in runs with secure aggregation (the coordinator sees sums)"
    )
    approved: list[Approval] = Field(
        default_factory=list, description="Task wheels and apps this site runs (`flowerbed supernode approve`)"
    )
    privacy: SitePrivacy | None = Field(
        None, description="This site's own DP-SGD budget: every run trains with it, none can loosen it"
    )

    @field_validator("site")
    @classmethod
    def _site(cls, value: str) -> str:
        return check_name(value, "site")

    @field_validator("superlink_address")
    @classmethod
    def _address(cls, value: str) -> str:
        return check_host(value)

    @field_validator("device")
    @classmethod
    def _device(cls, value: str) -> str:
        from flowerbed.clientapp.device import check_device

        return check_device(value)

    @property
    def superlink(self) -> str:
        """The gateway as HOST:PORT."""
        return f"{self.superlink_address}:{self.superlink_port}"


class FederationConfig(_Model):
    """The content of ``federation.toml``."""

    name: str
    supernode_port: Port = Field(
        9094, description="Loopback port of each site's SuperNode local API (written into every site kit)"
    )
    superlink: SuperLinkSettings
    sites: list[Site] = Field(min_length=1)
    run: RunSettings = Field(default_factory=lambda: RunSettings.model_validate({}))

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        return check_name(value, "federation")

    @model_validator(mode="after")
    def _unique_sites(self) -> FederationConfig:
        names = [s.name for s in self.sites]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"site names must be unique, repeated: {', '.join(dupes)}")
        link = self.superlink
        if self.supernode_port in (link.port, link.internal_port, link.health_port, link.executor_health_port):
            raise ValueError(f"supernode_port {self.supernode_port} is one of the coordinator's ports: choose another")
        if self.run.min_nodes > len(self.sites):
            raise ValueError(f"run.min_nodes is {self.run.min_nodes} but only {len(self.sites)} sites are listed")
        return self

    def site(self, name: str) -> Site:
        """The site called ``name``, or an error listing the known ones."""
        for site in self.sites:
            if site.name == name:
                return site
        known = ", ".join(s.name for s in self.sites)
        raise FlowerbedError(f"unknown site {name!r}: the federation lists {known}")


def format_validation_error(source: str, error: ValidationError) -> list[str]:
    """One line per invalid field: ``source: field: reason``."""
    lines = []
    for item in error.errors():
        where = ".".join(str(p) for p in item["loc"]) or "(file)"
        msg = item["msg"].removeprefix("Value error, ")
        lines.append(f"{source}: {where}: {msg}")
    return lines


class ConfigError(FlowerbedError):
    """A config file failed to parse or validate; ``details`` has one line per field."""

    exit_code = ExitCode.INVALID_CONFIG

    def __init__(self, message: str, details: list[str] | None = None) -> None:
        super().__init__(message)
        self.details = details or []


def load_toml_model(path: Path, model: type[M], *, missing: str = "create it with `flowerbed init`") -> M:
    """Read and validate a TOML file into ``model``; errors name the file and field.

    ``missing`` is the advice when the file does not exist (it differs for a coordinator and a site).
    """
    if not path.is_file():
        raise FlowerbedError(f"{path} does not exist: {missing}")
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path} is not valid TOML: {exc}") from None
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        details = format_validation_error(str(path), exc)
        raise ConfigError(f"{path} is invalid ({len(details)} problem(s))", details) from None


def save_toml_model(path: Path, model: BaseModel) -> None:
    """Write ``model`` as TOML (atomically: temp file then rename).

    A federation's [run] keeps only the settings given (its defaults stay defaults, so that an own
    task's defaults hold where federation.toml says nothing).
    """
    data = model.model_dump(exclude_none=True)
    if isinstance(model, FederationConfig):
        given = set(model.run.sources()) & set(RunSettings.model_fields)
        data["run"] = model.run.model_dump(exclude_none=True, include=given)
        if model.run.task_settings:
            data["run"]["task_settings"] = dict(model.run.task_settings)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(tomli_w.dumps(data), encoding="utf-8")
    tmp.replace(path)


def resolve(model: M, overrides: dict[str, Any]) -> M:
    """The one way a config file and command-line options merge: options that were given win.

    ``None`` means "not given". The result is validated as a whole, so an option that breaks a
    rule of the file (e.g. ``--min-nodes`` above the number of sites) is reported like a bad field.
    """
    given = {k: v for k, v in overrides.items() if v is not None}
    unknown = sorted(set(given) - set(type(model).model_fields))
    if unknown:
        raise ValueError(f"resolve(): {type(model).__name__} has no field(s) {', '.join(unknown)}")
    try:
        return type(model).model_validate(model.model_dump() | given)
    except ValidationError as exc:
        details = format_validation_error("options", exc)
        raise ConfigError(f"invalid options ({len(details)} problem(s))", details) from None


def load_federation(fed_dir: Path) -> FederationConfig:
    """Load ``FED_DIR/federation.toml``."""
    return load_toml_model(
        fed_dir / FEDERATION_FILE,
        FederationConfig,
        missing=f"run `flowerbed init {fed_dir}` first, or pass the federation folder with -d",
    )
