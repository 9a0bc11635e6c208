"""Benchmark 2, time to federation: from an empty folder to a converged 3-site TLS + node-auth federation.

Everything through the CLI on loopback, as the quickstarts say, each phase timed: ``flowerbed init``,
``certs init`` + ``certs server``, ``kit build`` (the flowerbed wheel built once beforehand and passed
with ``--wheel``), unpacking the three kits, ``superlink start`` until its gateway answers, three
``supernode start --kit`` until each is connected, ``flowerbed run`` (its training rounds are taken
out: the history's round seconds), and stopping everything. Untimed: making the sites' data, and
editing federation.toml/site.toml (ports free on this machine, the demo's tabular recipe, data_path).
Target: under 60 s of kit steps, training excluded. Writes docs/benchmarks/time_to_federation.json/.png.

    python -m benchmarks.time_to_federation [--rounds 3] [--smoke] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
import tomllib
from pathlib import Path
from typing import IO, Any

import tomli_w

from benchmarks import federations as fed
from benchmarks.common import OUT, show, write
from benchmarks.kit_ops import CLI, build_wheel, timed
from flowerbed.probes import free_port, tcp_open
from flowerbed.proc import child_env


class Background:
    """A CLI command left running; its output is watched for a line."""

    def __init__(self, args: list[str], cwd: Path, log: Path) -> None:
        self.lines: list[str] = []
        self.popen = subprocess.Popen([*CLI, *args], cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      start_new_session=True, env=child_env())  # fmt: skip
        self.log = log
        threading.Thread(target=self._read, args=(self.popen.stdout,), daemon=True).start()

    def _read(self, stream: IO[bytes] | None) -> None:
        assert stream is not None
        with self.log.open("w") as log:
            for raw in iter(stream.readline, b""):
                line = raw.decode(errors="replace")
                self.lines.append(line)
                log.write(line)

    def wait_for(self, text: str, timeout_s: float) -> None:
        end = time.monotonic() + timeout_s
        while time.monotonic() < end:
            if any(text in line for line in self.lines):
                return
            if self.popen.poll() is not None:
                break
            time.sleep(0.05)
        raise RuntimeError(f"no {text!r} within {timeout_s:.0f} s; see {self.log}")

    def stop(self) -> None:
        if self.popen.poll() is None:
            os.killpg(self.popen.pid, signal.SIGTERM)
            try:
                self.popen.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(self.popen.pid, signal.SIGKILL)
                self.popen.wait(timeout=10)


def run_once(root: Path, rounds: int, wheel: Path) -> dict[str, Any]:
    demo = fed.data(root / "site-data")
    fed_dir = root / "fed"
    phases: dict[str, float] = {}
    sites = fed.SITES
    port = free_port()
    phases["init"] = timed(["init", str(fed_dir), "--superlink-address", "localhost", "--san", "127.0.0.1",
                            "--port", str(port), *[a for s in sites for a in ("--site", s)]], root)  # fmt: skip
    config = tomllib.loads((fed_dir / "federation.toml").read_text())  # untimed: free ports, the tabular recipe
    config["superlink"] |= {"internal_port": free_port(), "health_port": free_port(),
                            "executor_health_port": free_port()}  # fmt: skip
    config["run"] = fed.settings(rounds).model_dump(exclude_none=True)
    (fed_dir / "federation.toml").write_text(tomli_w.dumps(config))
    phases["certs"] = timed(["certs", "init", "-d", str(fed_dir)], root) + timed(["certs", "server", "-d",
                                                                                     str(fed_dir)], root)  # fmt: skip
    phases["kits"] = timed(["kit", "build", "-d", str(fed_dir), "--wheel", str(wheel)], root)
    start = time.monotonic()
    for site in sites:
        with tarfile.open(fed_dir / "kits" / f"{site}.tar.gz") as tar:
            tar.extractall(root / "vm", filter="data")
    phases["unpack kits"] = time.monotonic() - start
    for i, site in enumerate(sites):  # untimed: the site researcher names the data
        site_toml = root / "vm" / site / "site.toml"
        kit = tomllib.loads(site_toml.read_text())
        kit["data_path"] = str(list(demo.site_files.values())[i])
        kit["supernode_port"] = free_port()
        site_toml.write_text(tomli_w.dumps(kit))
    running: list[Background] = []
    try:
        start = time.monotonic()
        link = Background(["superlink", "start", "-d", str(fed_dir)], root, root / "superlink-start.log")
        running.append(link)
        link.wait_for("submit a run with", 120)
        phases["superlink start"] = time.monotonic() - start
        start = time.monotonic()
        for site in sites:
            running.append(Background(["supernode", "start", "--kit", str(root / "vm" / site), "--threads", "1"],
                                      root, root / f"{site}.log"))  # fmt: skip
        for node in running[1:]:
            node.wait_for("connected to", 180)
        phases["sites start"] = time.monotonic() - start
        start = time.monotonic()
        run_s = timed(["run", "-d", str(fed_dir), "--name", "first"], root)
        history = [json.loads(line) for line in (fed_dir / "runs" / "first" / "history.jsonl").read_text().splitlines()]
        training = sum(float(r["seconds"]) for r in history)
        phases["run (without its rounds)"] = run_s - training
    finally:
        start = time.monotonic()
        for proc in reversed(running):
            proc.stop()
        phases["stop"] = time.monotonic() - start
    assert not tcp_open("127.0.0.1", port), "the gateway still listens"
    return {"phases_s": phases, "kit_steps_s": sum(phases.values()), "training_s": training,
            "rounds": len([r for r in history if r["kind"] == "train"])}  # fmt: skip


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--smoke", action="store_true", help="2 rounds (CI)")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="fb-bench-ttf-") as tmp:
        root = Path(tmp)
        wheel = build_wheel(root / "wheel")
        result = run_once(root, 2 if args.smoke else args.rounds, wheel)
    phases = result["phases_s"]
    show("Time to federation, 3 sites on loopback (seconds)", ["phase", "seconds"],
         [*[[k, v] for k, v in phases.items()], ["kit steps in all", result["kit_steps_s"]],
          [f"training ({result['rounds']} rounds, excluded)", result["training_s"]]])  # fmt: skip

    def plot(ax: Any) -> None:
        left = 0.0
        for name, value in phases.items():
            ax.barh([0], [value], left=left, label=name)
            left += value
        ax.axvline(60, color="red", linestyle="--", linewidth=1, label="target: 60 s")
        ax.set_yticks([])
        ax.set_xlabel("seconds (training excluded)")
        ax.set_title("From an empty folder to a converged 3-site federation")
        ax.legend(fontsize=7, loc="upper right")

    result |= {"smoke": args.smoke, "sites": 3}
    write("time_to_federation", args.out, result, plot)
    return result


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
