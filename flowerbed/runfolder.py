"""A run's output folder: its layout, its readers and its writers, in one place.

``runs/NAME/`` holds ``app/pyproject.toml`` (the run's Flower App manifest, written at submit),
``history.jsonl`` and ``history.csv`` (rows appended as rounds end, each line whole),
``checkpoints/round-NNNN.pt`` (written before its round's row) and ``checkpoints/best.pt``,
``settings.json`` (the effective settings, with where each came from),
``run-id`` (the Flower run that works on it now), ``serverapp.json`` (the ServerApp process that
works on it), ``resuming`` (while a resume is submitted), ``stop-requested`` (`flowerbed runs
stop`) and, once it has ended, ``summary.json``, ``final_model.pt`` and ``metrics.png``. A folder
without ``summary.json`` whose ServerApp process is gone was interrupted.
"""

from __future__ import annotations

import csv
import io
import json
import os
import socket
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from flowerbed.diskspace import append_whole, ensure_space, is_disk_full, write_atomic, write_atomic_with

if TYPE_CHECKING:
    import torch

APP_MANIFEST = "app/pyproject.toml"  # the run's Flower App (the kit's manifest-only app)
HISTORY_JSONL = "history.jsonl"
HISTORY_CSV = "history.csv"
SUMMARY = "summary.json"
FEATURE_SCALING = "feature_scaling.json"  # federated standardization: the global mean and std, or why none
SETTINGS = "settings.json"  # the effective settings as the task saw them at submit, each with its source
CKKS_KEYRING = "ckks.json"  # CKKS: the key's id, public context, maker, sites' exchange keys and wrapped keys
FINAL_MODEL = "final_model.pt"
PLOT = "metrics.png"
TRAIN = "train"
FINAL_EVAL = "final-eval"  # the last model's own evaluation, after max-rounds or the time budget
HELD_OUT = "held-out"  # the final model on the sites' held-out test data, once, after the final evaluation
WAITING = "waiting"  # a round short of min-nodes because sites are away, retried after a wait
FAILED = "failed"  # the round that ended the run (a resumed run trains this round again)
STOPPED = "stopped"  # a round that too few sites could train in (their privacy budgets are spent)
AWAY = "away"  # a site a round waits for has not reached the SuperLink for a while (named, with since when)
RESUMED = "resumed"  # the run went on from its last checkpoint (after a coordinator crash or a failed run)
PLOTTED = (TRAIN, FINAL_EVAL)
SAVE_OVERHEAD = 64 * 1024  # torch.save's bytes beside the tensors' (its zip records and the pickled keys)
BEST = "best.pt"
COLUMNS = [
    "round", "kind", "nodes", "failures", "train_loss", "eval_loss", "eval_accuracy", "seconds", "stop_reason",
]  # fmt: skip


@dataclass
class RoundRow:
    """One round. eval_* describe the global model that was sent out in this round."""

    round: int
    nodes: int
    failures: int
    train_loss: float | None
    eval_loss: float | None
    eval_accuracy: float | None
    seconds: float
    stop_reason: str = ""
    errors: list[str] = field(default_factory=list)
    kind: str = TRAIN
    sites: list[str] = field(default_factory=list)  # the sites whose valid replies made this round
    missing: list[str] = field(default_factory=list)  # sites seen earlier in the run that this round lacked
    metrics: dict[str, float] = field(default_factory=dict)  # every aggregated metric (train-*, eval-*)
    privacy: dict[str, float] = field(default_factory=dict)  # site -> epsilon it has spent so far (DP-SGD)
    per_site: dict[str, dict[str, float]] = field(default_factory=dict)  # final evaluation: each site's metrics
    pooled: list[str] = field(default_factory=list)  # metrics computed from the sites' pooled statistics (else:
    # the mean of the sites' values, weighted by their examples)
    examples: dict[str, int] = field(default_factory=dict)  # site -> the training examples of its update
    code: dict[str, str] = field(default_factory=dict)  # site -> digest of the own task's files it ran
    classes: dict[str, dict[str, int]] = field(default_factory=dict)  # site -> its training split's class counts
    approved: dict[str, str] = field(default_factory=dict)  # site -> when it approved the own task that ran
    traffic: dict[str, int] = field(default_factory=dict)  # bytes of the round's messages: "down" (to all sites), "up"


class History:
    """Append-only writer for a run's output folder."""

    def __init__(self, out_dir: Path, rows: list[RoundRow] | None = None) -> None:
        """``rows``: those already written (a resumed run appends to its own history)."""
        self.out_dir = out_dir
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "checkpoints").mkdir(exist_ok=True)
        self.rows: list[RoundRow] = list(rows or [])

    def append(self, row: RoundRow) -> None:
        """Write ``row`` to history.jsonl and history.csv, each line whole or not at all (a full disk raises).

        history.csv has a column for every metric the rows report (``csv_columns``); a row that brings
        a new one rewrites the file whole with the wider header (atomically), else its line is appended.
        """
        path = self.out_dir / HISTORY_CSV
        header = _csv_header(path)
        columns = csv_columns([*self.rows, row], header)
        append_whole(self.out_dir / HISTORY_JSONL, (json.dumps(asdict(row)) + "\n").encode("utf-8"))
        if header is not None and header == columns:
            append_whole(path, csv_text([row], columns, header=False).encode("utf-8"))
        else:
            write_atomic(path, csv_text([*self.rows, row], columns).encode("utf-8"))
        self.rows.append(row)

    def checkpoint(self, server_round: int, state_dict: dict[str, torch.Tensor], keep: int = 3) -> Path | None:
        """Save this round's aggregated model; keep only the last ``keep`` round checkpoints (0: none).

        The space it needs is checked first; a full disk raises :class:`DiskFullError` and leaves no
        partial file (a crash mid-write never leaves a half checkpoint either).
        """
        folder = self.out_dir / "checkpoints"
        path = checkpoint_path(self.out_dir, server_round)
        if keep > 0:
            _save(state_dict, path)
        for old in sorted(folder.glob("round-*.pt"))[: -keep or None]:
            old.unlink()
        return path if keep > 0 else None

    def save_best(self, server_round: int, state_dict: dict[str, torch.Tensor]) -> Path:
        """The best evaluated trained model so far, as checkpoints/best.pt (kept whatever ``keep`` is)."""
        path = self.out_dir / "checkpoints" / BEST
        _save({"round": server_round, "state_dict": state_dict}, path)
        return path

    def finish(self, state_dict: dict[str, torch.Tensor] | None, summary: dict[str, Any]) -> None:
        """Write the final model, summary.json and the plot (each whole, or not at all)."""
        if state_dict is not None:
            _save(state_dict, self.out_dir / FINAL_MODEL)
        write_atomic(self.out_dir / SUMMARY, json.dumps(summary, indent=2).encode("utf-8"))
        if self.rows:
            try:
                plot_history(self.rows, self.out_dir / PLOT)
            except OSError as exc:  # the plot is a view of the history: a full disk costs only it
                (self.out_dir / PLOT).unlink(missing_ok=True)
                if not is_disk_full(exc):
                    raise


def metric_column(key: str) -> str:
    """A metric's column name (``eval-auroc`` -> ``eval_auroc``), as history.csv and the notebook name it."""
    return key.replace("-", "_")


def csv_columns(rows: list[RoundRow], header: list[str] | None = None) -> list[str]:
    """history.csv's columns: ``COLUMNS``, then one per metric (eval first, each once; those of
    ``header``, the file's present header, keep their place)."""
    columns = list(header or COLUMNS)
    names = sorted({metric_column(k) for r in rows for k in r.metrics}, key=lambda c: (not c.startswith("eval"), c))
    return columns + [c for c in names if c not in columns]


def csv_text(rows: list[RoundRow], columns: list[str], *, header: bool = True) -> str:
    """``rows`` as CSV lines under ``columns`` (a final evaluation's round is left empty: it is no round)."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")  # one kind of line ending, as in the JSON lines
    if header:
        writer.writerow(columns)
    for row in rows:
        values = {**{metric_column(k): v for k, v in row.metrics.items()}, **asdict(row)}
        if row.kind in (FINAL_EVAL, HELD_OUT):
            values["round"] = None
        writer.writerow(["" if values.get(c) is None else values[c] for c in columns])
    return out.getvalue()


def best_evaluation(rows: list[RoundRow], best_round: int | None, rounds: int) -> tuple[str, dict[str, float]]:
    """Which evaluation chose the best model (``round K``, or the final evaluation after the last round),
    and every eval metric it measured (by name, without ``eval-``)."""
    if best_round is None:
        return "none", {}
    final = best_round > rounds
    row = next((r for r in reversed(rows) if (r.kind == FINAL_EVAL if final else
                                              r.kind == TRAIN and r.round == best_round)), None)  # fmt: skip
    where = f"the final evaluation (after round {rounds})" if final else f"round {best_round}"
    found = {k.removeprefix("eval-"): v for k, v in (row.metrics if row else {}).items() if k.startswith("eval-")}
    for name, value in (("loss", row.eval_loss if row else None), ("accuracy", row.eval_accuracy if row else None)):
        if value is not None:
            found.setdefault(name, value)
    return where, found


def metric_kinds(rows: list[dict[str, Any]]) -> dict[str, str]:
    """How each evaluation metric of the run (by name, without ``eval-``) combines the sites' results:
    ``pooled`` (from the sites' summed statistics, as on all their data as one) or ``weighted mean``
    (the mean of the sites' values, weighted by their examples)."""
    pooled = {k.removeprefix("eval-") for r in rows for k in r.get("pooled", [])}
    names = [k.removeprefix("eval-") for r in rows for k in r.get("metrics", {}) if k.startswith("eval-")]
    return {name: "pooled" if name in pooled else "weighted mean" for name in dict.fromkeys(names)}


def _csv_header(path: Path) -> list[str] | None:
    try:
        with path.open(newline="", encoding="utf-8") as handle:
            return next(csv.reader(handle), None)
    except OSError:
        return None


def _save(obj: Any, path: Path) -> None:
    """torch.save through a temporary file: whole, or nothing; the space it needs is checked first. It writes
    straight to the file: a 100 MB model is not serialized into memory (and copied there again) first."""
    import torch

    needed = _tensor_bytes(obj) + SAVE_OVERHEAD
    ensure_space(path.parent, needed)
    write_atomic_with(path, lambda handle: torch.save(obj, handle), needed)


def _tensor_bytes(obj: Any) -> int:
    """The bytes of the tensors in ``obj`` (a state dict, or a dict holding one), as torch.save writes them."""
    import torch

    if isinstance(obj, torch.Tensor):
        return int(obj.untyped_storage().nbytes()) + 256  # its zip record: headers, name, 64-byte alignment
    if isinstance(obj, dict):
        return sum(_tensor_bytes(value) for value in obj.values())
    return 0


def repair(out_dir: Path) -> list[str]:
    """Cut a torn last line off history.jsonl and history.csv (kept in ``NAME.torn``); one line per repair.

    A coordinator killed mid-write, or a disk that filled up, can leave a half line; a resumed run
    must not append onto it. Lines are checked from the end: a JSON line must parse, a CSV line must
    have the history's columns. CRLF endings of older files become LF.
    """
    notes = []
    width = len(_csv_header(out_dir / HISTORY_CSV) or COLUMNS)
    for name, good in ((HISTORY_JSONL, _json_line), (HISTORY_CSV, lambda line: _csv_line(line, width))):
        path = out_dir / name
        if not path.exists():
            continue
        data = path.read_bytes()
        *complete, tail = data.replace(b"\r\n", b"\n").split(b"\n")  # tail: what follows the last newline
        cut = [tail] if tail else []
        while complete and not good(complete[-1]):
            cut.insert(0, complete.pop())
        kept = b"".join(line + b"\n" for line in complete)
        if cut:
            with (out_dir / (name + ".torn")).open("ab") as torn:
                torn.write(b"\n".join(cut) + b"\n")
            notes.append(f"{name}: cut a torn last line of {sum(map(len, cut))} bytes (kept in {name}.torn)")
        if kept != data:
            write_atomic(path, kept)
    return notes


def _json_line(line: bytes) -> bool:
    try:
        return isinstance(json.loads(line.decode("utf-8")), dict)
    except (UnicodeDecodeError, ValueError):
        return False


def _csv_line(line: bytes, width: int) -> bool:
    try:
        rows = list(csv.reader(io.StringIO(line.decode("utf-8"))))
    except (UnicodeDecodeError, csv.Error):
        return False
    return len(rows) == 1 and len(rows[0]) == width and "\0" not in line.decode("utf-8")


def checkpoint_path(out_dir: Path, server_round: int) -> Path:
    """Where the model aggregated in ``server_round`` is kept."""
    return out_dir / "checkpoints" / f"round-{server_round:04d}.pt"


def row_from_dict(data: dict[str, Any]) -> RoundRow:
    """A history.jsonl line as a row (keys that a newer or older kit wrote are tolerated)."""
    known = set(RoundRow.__dataclass_fields__)
    return RoundRow(**{k: v for k, v in data.items() if k in known})


def read_jsonl(path: Path, *, stop_at_bad: bool = True) -> list[dict[str, Any]]:
    """The JSON lines of ``path`` (empty when it is missing); a line that is not JSON ends the read
    (a half-written last line), or with ``stop_at_bad=False`` is skipped (the audit trail's reader)."""
    if not path.exists():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rows.append(json.loads(line))
        except ValueError:
            if stop_at_bad:
                break
    return rows


def read_rows(out_dir: Path) -> list[dict[str, Any]]:
    """Rows written so far (for live progress); a half-written last line is skipped."""
    return read_jsonl(out_dir / HISTORY_JSONL)


def run_folders(runs: Path) -> list[Path]:
    """The run folders under ``runs`` (those with the run's app manifest), by name."""
    return sorted(manifest.parent.parent for manifest in runs.glob(f"*/{APP_MANIFEST}"))


def plot_history(rows: list[RoundRow], path: Path) -> None:
    """The run as a PNG: train and eval loss in one panel, then one panel per evaluation metric the task
    reports (accuracy, auroc ...), each over the rounds; the final evaluation as a star after the last round."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    trained = [r for r in rows if r.kind == TRAIN]  # waits, failures and resumes are not rounds
    final = next((r for r in reversed(rows) if r.kind == FINAL_EVAL), None)
    names = sorted({k for r in rows if r.kind in PLOTTED for k in r.metrics if k.startswith("eval-")} - {"eval-loss"},
                   key=lambda k: (k != "eval-accuracy", k))  # fmt: skip
    panels = 1 + len(names)
    cols = min(panels, 3)
    lines = -(-panels // cols)
    fig, grid = plt.subplots(lines, cols, figsize=(5 * cols, 4 * lines), squeeze=False)
    axes = [ax for line in grid for ax in line]
    rounds = [r.round for r in trained]
    after = rounds[-1] + 1 if rounds else 1
    for key, label in (("train_loss", "train loss"), ("eval_loss", "eval loss (global model)")):
        axes[0].plot(rounds, [getattr(r, key) for r in trained], marker="o", label=label)
    if final is not None and final.eval_loss is not None:
        axes[0].plot([after], [final.eval_loss], marker="*", markersize=12, linestyle="", label="final evaluation")
    axes[0].set_ylabel("loss")
    axes[0].legend()
    for ax, key in zip(axes[1:], names, strict=False):
        ax.plot(rounds, [r.metrics.get(key) for r in trained], marker="o", color="tab:green")
        if final is not None and final.metrics.get(key) is not None:
            ax.plot([after], [final.metrics[key]], marker="*", markersize=12, linestyle="", color="tab:red")
        ax.set_ylabel(f"eval {key.removeprefix('eval-')} (global model)")
    for ax in axes[:panels]:
        ax.set_xlabel("round")
    for ax in axes[panels:]:
        ax.set_visible(False)
    stop = trained[-1].stop_reason if trained else ""
    fig.suptitle(f"flowerbed run: {len(trained)} rounds" + (f", stopped: {stop}" if stop else ""))
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


SERVERAPP_FILE = "serverapp.json"
RUN_ID_FILE = "run-id"
RESUMING_FILE = "resuming"  # present while a resume of the folder is being submitted
STOP_FILE = "stop-requested"  # `flowerbed runs stop`: the run ends after its current round


def process_start(pid: int) -> str | None:
    """An identity of a running process that a reused pid does not share (None: not running).

    Linux: the start time from /proc; elsewhere only whether the pid exists.
    """
    stat = Path(f"/proc/{pid}/stat")
    if stat.parent.parent.is_dir() and Path("/proc/self/stat").exists():
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            return None
        return None if fields[0] == "Z" else fields[19]  # state, ..., starttime (field 22)
    if os.name != "posix":  # os.kill(pid, 0) would send Ctrl-C on Windows; the coordinator runs on Linux
        return "unknown"
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, PermissionError, OSError):
        return None
    return "alive"


def mark_serverapp(out_dir: Path, run_id: int) -> None:
    """Record the ServerApp process working on this folder (the coordinator watches it)."""
    data = {
        "pid": os.getpid(),
        "start": process_start(os.getpid()),
        "host": socket.gethostname(),
        "run_id": run_id,
        "since": time.time(),
    }
    path = out_dir / SERVERAPP_FILE
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data), encoding="utf-8")
    tmp.replace(path)


def serverapp_alive(out_dir: Path) -> bool | None:
    """Whether the ServerApp recorded in the folder still runs (None: none was recorded yet)."""
    path = out_dir / SERVERAPP_FILE
    try:
        data = json.loads(path.read_text("utf-8"))
    except (OSError, ValueError):
        return None
    if data.get("host") != socket.gethostname():
        return None  # written on another host: cannot tell from here
    if data.get("run_id") != run_id_of(out_dir):
        return None  # the process of an earlier Flower run; the current one has not started yet
    start = process_start(int(data["pid"]))
    return start is not None and start == data.get("start")


def ended(out_dir: Path) -> dict[str, Any] | None:
    """The run's summary once it has ended (completed, failed or stopped), else None."""
    try:
        data: dict[str, Any] = json.loads((out_dir / SUMMARY).read_text("utf-8"))
    except (OSError, ValueError):
        return None
    return data


def run_id_of(out_dir: Path) -> int | None:
    """The Flower run that works on this folder now (a resume gives it a new one)."""
    try:
        return int((out_dir / RUN_ID_FILE).read_text("utf-8").strip())
    except (OSError, ValueError):
        return None


def write_settings(out_dir: Path, rows: list[tuple[str, Any, str]]) -> None:
    """Keep the run's effective settings (key, value, source) in ``settings.json``."""
    data = [{"key": key, "value": value, "source": source} for key, value, source in rows]
    write_atomic(out_dir / SETTINGS, (json.dumps(data, indent=1, default=str) + "\n").encode())


def write_feature_scaling(out_dir: Path, record: dict[str, Any]) -> None:
    """Keep what the run standardized its features with (``status``: standardized, or off and why)."""
    write_atomic(out_dir / FEATURE_SCALING, (json.dumps(record, indent=1) + "\n").encode())


def read_feature_scaling(out_dir: Path) -> dict[str, Any] | None:
    """The run's feature scaling as kept (None: the task's model has no scaling layer, or an older run)."""
    try:
        data = json.loads((out_dir / FEATURE_SCALING).read_text("utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def write_keyring(out_dir: Path, record: dict[str, Any]) -> None:
    """Keep a CKKS run's keyring: public parts and wrapped (opaque) keys only, never a secret key."""
    write_atomic(out_dir / CKKS_KEYRING, (json.dumps(record, indent=1) + "\n").encode())


def read_keyring(out_dir: Path) -> dict[str, Any] | None:
    """A CKKS run's keyring as kept (None: the run is not under CKKS, or has no key yet)."""
    try:
        data = json.loads((out_dir / CKKS_KEYRING).read_text("utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def read_settings(out_dir: Path) -> list[dict[str, Any]]:
    """The run's effective settings as kept at submit (empty: none kept, e.g. an older run)."""
    try:
        data = json.loads((out_dir / SETTINGS).read_text("utf-8"))
    except (OSError, ValueError):
        return []
    return [row for row in data if isinstance(row, dict)] if isinstance(data, list) else []


def request_stop(out_dir: Path, why: str) -> None:
    """Ask the run's ServerApp to end after its current round (it reads :func:`stop_requested`)."""
    write_atomic(out_dir / STOP_FILE, (why.strip() or "stopped by the coordinator").encode())


def stop_requested(out_dir: Path) -> str | None:
    """Why the coordinator asked the run to stop, or None when it did not."""
    try:
        return (out_dir / STOP_FILE).read_text("utf-8").strip() or "stopped by the coordinator"
    except OSError:
        return None
