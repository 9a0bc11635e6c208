"""Sample-level differential privacy that a site sets and enforces: DP-SGD with Opacus and a ledger.

The site's budget (``[privacy]`` in its site.toml, passed to the ClientApp in the SuperNode's node
config, where no run can change it) and the run's request (``dp = "sample"``) combine into the
stricter of the two. Every train task reserves its steps in the site's ledger (a JSON file in the
SuperNode's work folder) *before* training, so that the spending survives the per-task processes,
a crash mid-task and SuperNode restarts, and is counted even if the update never leaves. A task
whose steps would take the spending past the budget is refused: the site trains no more.
"""

from __future__ import annotations

import json
import math
import os
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from flowerbed.config import RunSettings, SitePrivacy
from flowerbed.errors import FlowerbedError

if TYPE_CHECKING:
    import torch
    from torch.utils.data import DataLoader

NODE_KEYS = {  # node-config key -> SitePrivacy field (the supervisor writes them from site.toml)
    "dp-epsilon": "epsilon",
    "dp-delta": "delta",
    "dp-max-grad-norm": "max_grad_norm",
    "dp-noise-multiplier": "noise_multiplier",
    "dp-accountant": "accountant",
    "dp-scope": "scope",
}
LEDGER_DIR = "dp-ledger"  # node-config key: the folder of the site's ledgers
SLACK = 1e-9  # relative: a spending equal to the budget is within it


class BudgetSpentError(FlowerbedError):
    """The next round would take the site's spending past its budget."""


@dataclass(frozen=True)
class Budget:
    """The (epsilon, delta) a site spends at most, and how DP-SGD runs under it."""

    epsilon: float
    delta: float
    max_grad_norm: float
    noise_multiplier: float | None  # None: the least noise with which the budget lasts the run's max_rounds
    accountant: str = "rdp"
    scope: str = "run"
    source: str = "site"  # site, run, or site+run (both asked; the stricter of each value holds)

    def describe(self) -> str:
        """The budget in one phrase, with who set it."""
        return f"epsilon {self.epsilon:g}, delta {self.delta:g} (set by the {self.source.replace('+', ' and the ')})"


def site_privacy(node_config: dict[str, Any]) -> SitePrivacy | None:
    """The site's own ``[privacy]`` from the SuperNode's node config (None: the site set no budget)."""
    values = {NODE_KEYS[k]: v for k, v in node_config.items() if k in NODE_KEYS and str(v) != ""}
    if "epsilon" not in values:
        return None
    return SitePrivacy.model_validate(values)


def node_config_of(privacy: SitePrivacy | None, ledger_dir: Path) -> dict[str, str]:
    """What the supervisor puts into the SuperNode's node config: the site's budget and its ledgers' folder."""
    fields = {v: k for k, v in NODE_KEYS.items()}
    values = privacy.model_dump() if privacy is not None else {}
    return {fields[name]: str(value) for name, value in values.items() if value is not None} | {
        LEDGER_DIR: str(ledger_dir)
    }


def ledger_folder(node_config: dict[str, Any]) -> Path:
    """Where this site keeps its ledgers (a SuperNode not started by the kit: ./dp-ledger of its folder)."""
    return Path(str(node_config.get(LEDGER_DIR) or "dp-ledger")).expanduser().resolve()


def effective_budget(site: SitePrivacy | None, run: RunSettings) -> Budget | None:
    """The stricter of the site's budget and the run's request; None when neither asks for DP-SGD.

    A run can ask for DP where a site set none, and for less epsilon than a site allows, but never
    for more: the site's values are upper bounds (its noise multiplier a lower bound).
    """
    asked = run.dp == "sample"
    if site is None and not asked:
        return None
    if site is None:
        return Budget(run.dp_epsilon, run.dp_delta, run.dp_max_grad_norm, None, source="run")
    if not asked:
        return Budget(site.epsilon, site.delta, site.max_grad_norm, site.noise_multiplier,
                      site.accountant, site.scope)  # fmt: skip
    return Budget(
        epsilon=min(site.epsilon, run.dp_epsilon),
        delta=min(site.delta, run.dp_delta),
        max_grad_norm=min(site.max_grad_norm, run.dp_max_grad_norm),
        noise_multiplier=site.noise_multiplier,
        accountant=site.accountant,
        scope=site.scope,
        source="site+run",
    )


Step = tuple[float, float, int]  # (noise multiplier, sample rate, steps): one entry of an Opacus accountant's history


def epsilon_spent(history: list[Step], delta: float, accountant: str = "rdp") -> float:
    """Epsilon at ``delta`` after the DP-SGD steps of ``history``, by Opacus's RDP or PRV accountant."""
    if not history:
        return 0.0
    from opacus.accountants import PRVAccountant, RDPAccountant

    counter: Any = PRVAccountant() if accountant == "prv" else RDPAccountant()
    counter.history = [tuple(step) for step in history]
    return float(counter.get_epsilon(delta))


def calibrate_noise(prior: list[Step], sample_rate: float, steps: int, budget: Budget) -> float:
    """The least noise multiplier with which ``prior`` plus ``steps`` more steps stay within the budget."""
    low, high = 0.3, 64.0
    if epsilon_spent([*prior, (high, sample_rate, steps)], budget.delta, budget.accountant) > budget.epsilon:
        raise BudgetSpentError(
            f"no noise multiplier up to {high:g} keeps {steps} DP-SGD steps within {budget.describe()}"
        )
    for _ in range(40):  # bisection to about 1e-10 relative
        mid = math.sqrt(low * high)
        spent = epsilon_spent([*prior, (mid, sample_rate, steps)], budget.delta, budget.accountant)
        low, high = (low, mid) if spent <= budget.epsilon else (mid, high)
        if high / low < 1.001:
            break
    return high


@dataclass
class Ledger:
    """What a site spent under one budget key: the accountant's history and epsilon after each round."""

    key: str
    history: list[Step] = field(default_factory=list)
    rounds: list[dict[str, Any]] = field(default_factory=list)  # {round, run_id, steps, epsilon, at}
    noise: dict[str, float] = field(default_factory=dict)  # run key -> the calibrated noise multiplier
    budget: dict[str, Any] = field(default_factory=dict)  # the Budget it was last spent under

    @classmethod
    def load(cls, folder: Path, key: str) -> Ledger:
        """The ledger ``key`` in ``folder`` (a new, empty one when none was written)."""
        path = folder / f"{key}.json"
        if not path.exists():
            return cls(key)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            return cls(key, [tuple(s) for s in data["history"]], list(data["rounds"]), dict(data.get("noise", {})),
                       dict(data.get("budget", {})))  # fmt: skip
        except (ValueError, KeyError, TypeError) as exc:
            # A ledger the site cannot read is never taken as "nothing spent".
            raise FlowerbedError(f"privacy ledger {path} is unreadable ({exc}): restore it from a backup") from None

    def save(self, folder: Path) -> Path:
        """Write the ledger whole; returns its path."""
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{self.key}.json"
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(asdict(self), indent=1), encoding="utf-8")
        with tmp.open("rb") as handle:
            os.fsync(handle.fileno())
        tmp.replace(path)
        return path


@dataclass
class PrivateTraining:
    """The DP-SGD of one train task at one site: hands the task Opacus-wrapped training objects.

    A task calls :meth:`make_private` with its model, optimizer and data loader (the built-in tasks
    do; an own task does in its ``train_private``); the steps are reserved in the ledger first.
    """

    site: str
    budget: Budget
    folder: Path
    run_key: str
    run_id: int
    server_round: int
    max_rounds: int
    spent: float | None = None  # epsilon after this task's steps, once reserved
    noise_multiplier: float | None = None
    steps: int = 0

    @property
    def ledger_key(self) -> str:
        """The ledger this training spends from: the site's own, or the run's."""
        return "all-runs" if self.budget.scope == "site" else self.run_key

    def spent_so_far(self) -> tuple[float, int]:
        """Epsilon spent under this budget and the rounds it was spent in, before this task."""
        ledger = Ledger.load(self.folder, self.ledger_key)
        return epsilon_spent(ledger.history, self.budget.delta, self.budget.accountant), len(ledger.rounds)

    def reserve(self, sample_rate: float, steps: int) -> float:
        """Record ``steps`` DP-SGD steps before they run; refuse (:class:`BudgetSpentError`) past the budget."""
        ledger = Ledger.load(self.folder, self.ledger_key)
        noise = self.budget.noise_multiplier or ledger.noise.get(self.run_key)
        if noise is None:  # the least noise that lasts the rest of the run's rounds
            left = max(self.max_rounds - self.server_round + 1, 1)
            noise = calibrate_noise(ledger.history, sample_rate, steps * left, self.budget)
            ledger.noise[self.run_key] = noise
        before = epsilon_spent(ledger.history, self.budget.delta, self.budget.accountant)
        after = epsilon_spent([*ledger.history, (noise, sample_rate, steps)], self.budget.delta, self.budget.accountant)
        if after > self.budget.epsilon * (1 + SLACK):
            raise BudgetSpentError(
                f"site {self.site}: privacy budget spent: {before:.3f} of epsilon {self.budget.epsilon:g} "
                f"(delta {self.budget.delta:g}) used in {len(ledger.rounds)} round(s); this round would bring it "
                f"to {after:.3f}, so this site trains no more" + (" in this run" if self.budget.scope == "run" else "")
            )
        ledger.history.append((noise, sample_rate, steps))
        ledger.budget = asdict(self.budget)
        ledger.rounds.append({"round": self.server_round, "run_id": self.run_id, "steps": steps,
                              "noise_multiplier": noise, "sample_rate": sample_rate, "epsilon": after,
                              "at": time.time()})  # fmt: skip
        ledger.save(self.folder)
        self.spent, self.noise_multiplier, self.steps = after, noise, steps
        return after

    def make_private(
        self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, loader: DataLoader[Any], epochs: int
    ) -> tuple[torch.nn.Module, torch.optim.Optimizer, DataLoader[Any]]:
        """Opacus DP-SGD (Poisson sampling, per-example clipping, Gaussian noise) for ``epochs`` epochs.

        Train with the returned objects; ``model`` itself holds the trained weights afterwards.
        """
        from opacus import PrivacyEngine

        batches = max(len(loader), 1)
        self.reserve(1.0 / batches, epochs * batches)
        with warnings.catch_warnings():  # Opacus's secure_mode needs torchcsprng (docs/privacy.md says so)
            warnings.filterwarnings("ignore", message="Secure RNG turned off")
            engine = PrivacyEngine(accountant=self.budget.accountant)
        private: tuple[Any, Any, Any] = engine.make_private(
            module=model,
            optimizer=optimizer,
            data_loader=loader,
            noise_multiplier=self.noise_multiplier,
            max_grad_norm=self.budget.max_grad_norm,
            poisson_sampling=True,
        )
        return private

    @staticmethod
    def release(module: torch.nn.Module) -> None:
        """Take Opacus's hooks off the model again (it can then be trained anew, e.g. in a test)."""
        close = getattr(module, "to_standard_module", None)
        if callable(close):
            close()

    def record(self) -> dict[str, Any]:
        """What the reply tells the coordinator about this site's spending (a ConfigRecord)."""
        return {
            "epsilon": float(self.spent or 0.0),
            "epsilon-budget": self.budget.epsilon,
            "delta": self.budget.delta,
            "noise-multiplier": float(self.noise_multiplier or 0.0),
            "steps": self.steps,
            "set-by": self.budget.source,
        }


@dataclass(frozen=True)
class LedgerSummary:
    """One ledger of a site, as its data steward sees it."""

    key: str
    rounds: int
    epsilon: float
    budget: float | None
    delta: float | None
    set_by: str
    last: str


def ledgers(folder: Path) -> list[LedgerSummary]:
    """What this site has spent, one line per ledger (run, or all runs), newest last."""
    out = []
    for path in sorted(folder.glob("*.json"), key=lambda p: p.stat().st_mtime):
        ledger = Ledger.load(folder, path.stem)
        budget = ledger.budget
        delta = budget.get("delta")
        spent = epsilon_spent(ledger.history, float(delta), str(budget.get("accountant", "rdp"))) if delta else 0.0
        last = ledger.rounds[-1] if ledger.rounds else {}
        when = time.strftime("%Y-%m-%d %H:%M", time.gmtime(float(last["at"]))) if "at" in last else "-"
        out.append(LedgerSummary(ledger.key, len(ledger.rounds), spent, budget.get("epsilon"), delta,
                                 str(budget.get("source", "-")), when))  # fmt: skip
    return out


def run_key(output_dir: str) -> str:
    """The ledger name of a run: its run folder's name (the same for a resumed run)."""
    import hashlib

    name = "".join(c if c.isalnum() or c in "-_." else "_" for c in Path(output_dir).name or "run")
    return f"run-{name[:60]}-{hashlib.sha256(output_dir.encode()).hexdigest()[:8]}"
