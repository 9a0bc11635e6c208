"""Benchmark 10, a real link: rounds over hospital links against the bytes-over-bandwidth floor.

Each site reaches the coordinator through its own link, a relay that caps it at SITE_MBIT each way
and delays every byte by DELAY_MS each way (tests/hosts/slowlink.py: this kernel has no netem), and
then through the coordinator's link, one relay capped at COORD_MBIT shared by all sites; all on
loopback. The kit federation (TLS, node auth, nginx, warm executors) runs the tabular MLP made wide to
MODEL_MB on 3 sites, without compression and with int8. The floor of a round: each site's bytes
down and up (the run history's ``traffic``) over its link's bandwidth, plus the round-trips of a
task's messages, plus the compute (every site's train and evaluate without Flower, divided by this
machine's 2 cores, which the sites share). Target: the kit's steady round within 1.3x the floor.
A second federation runs the same rounds through relays that neither delay nor cap: its round is what
this machine's own processing of the bytes costs (TLS, HTTP, hashing and copies at every hop, for all
sites and the coordinator on the same cores), which the floor leaves out; the difference is what the
link added. Writes docs/benchmarks/wan.json and .png.

    python -m benchmarks.wan [--model-mb 50] [--rounds 3] [--site-mbit 100] [--coord-mbit 1000]
                             [--delay-ms 30] [--smoke] [--out DIR]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks import federations as fed
from benchmarks.common import OUT, show, write
from benchmarks.compression import one_run
from benchmarks.transfer import hidden_for
from flowerbed.probes import free_port, tcp_open
from flowerbed.proc import ManagedProcess

MODES = ("none", "int8")
ROUND_TRIPS = 6  # a task's pull and its object pulls, the reply's pushes and confirmation: a few round-trips
REPO = Path(__file__).resolve().parent.parent


class Links:
    """The relays of the run: the coordinator's link in front of the gateway, then one link per site."""

    def __init__(self, root: Path, site_mbit: float, coord_mbit: float, delay_ms: float) -> None:
        self.root, self.site_mbit, self.coord_mbit, self.delay_ms = root, site_mbit, coord_mbit, delay_ms
        self.relays: list[ManagedProcess] = []
        self.coordinator: str | None = None

    def _relay(self, name: str, target: str, delay_ms: float, mbit: float) -> str:
        host, port = target.rsplit(":", 1)
        listen = free_port()
        argv = [sys.executable, "-m", "tests.hosts.slowlink", "127.0.0.1", str(listen), "127.0.0.1", port,
                str(delay_ms), str(mbit)]  # fmt: skip
        relay = ManagedProcess(name=f"link {name}", argv=argv, log_path=self.root / f"link-{name}.log", cwd=REPO)
        self.relays.append(relay.start())
        relay.wait_ready(lambda: tcp_open("127.0.0.1", listen), 30)
        return f"{host}:{listen}"  # the gateway's name (its certificate's), the relay's port

    def route(self, site: str, gateway: str) -> str:
        if self.coordinator is None:
            self.coordinator = self._relay("coordinator", gateway, 0, self.coord_mbit)
        return self._relay(site, self.coordinator, self.delay_ms, self.site_mbit)

    def stop(self) -> None:
        for relay in reversed(self.relays):
            relay.stop(grace_s=5)


def measure(root: Path, demo: Any, links: Links, *, sites: list[str], model_mb: float, rounds: int,
            modes: tuple[str, ...], cores: int, floor: bool = True) -> dict[str, dict[str, Any]]:  # fmt: skip
    """Each mode's steady round on a kit federation in ``root`` whose sites reach the gateway through ``links``;
    with ``floor``, the compute floor too (every site's train and evaluate without Flower, over ``cores``)."""
    out: dict[str, dict[str, Any]] = {}
    try:
        with fed.kit(root, demo, sites=sites, route=links.route) as kit:
            for mode in modes:
                settings = fed.settings(rounds, min_nodes=len(sites), local_epochs=1, hidden_units=hidden_for(model_mb),
                                        compression=mode, round_timeout_s=1800)  # fmt: skip
                compute = min(fed.compute_floor(demo, settings, 2, sites=len(sites))) / cores if floor else None
                out[mode] = one_run(kit, settings, f"wan-{mode}") | {"compute_s": compute}
                time.sleep(1)
    finally:
        links.stop()
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-mb", type=float, default=50.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--site-mbit", type=float, default=100.0)
    parser.add_argument("--coord-mbit", type=float, default=1000.0)
    parser.add_argument("--delay-ms", type=float, default=30.0)
    parser.add_argument("--smoke", action="store_true", help="2 sites, a 2 MB model, 2 rounds, int8 only (CI)")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)
    model_mb, rounds, modes = (2.0, 2, ("int8",)) if args.smoke else (args.model_mb, args.rounds, MODES)
    sites = fed.SITES[:2] if args.smoke else fed.SITES
    site_mb_s = args.site_mbit / 8
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="fb-bench-wan-") as tmp:
        root = Path(tmp)
        demo = fed.data(root / "data")
        cores = min(len(sites), os.cpu_count() or 1)  # the sites share this machine's cores
        shape: dict[str, Any] = {"sites": sites, "model_mb": model_mb, "rounds": rounds, "modes": modes, "cores": cores}
        linked = measure(root / "wan", demo, Links(root / "wan", args.site_mbit, args.coord_mbit, args.delay_ms),
                         **shape)  # fmt: skip
        # The same relays with neither delay nor cap: what this machine's own processing of the bytes costs.
        unlinked = {} if args.smoke else measure(root / "local", demo, Links(root / "local", 0, 0, 0), floor=False,
                                                 **shape)  # fmt: skip
        for mode, measured in linked.items():
            compute = measured.pop("compute_s")
            per_site = measured["bytes_per_round"] / 1e6 / len(sites)
            link_s = per_site / site_mb_s + ROUND_TRIPS * 2 * args.delay_ms / 1000
            floor = link_s + compute
            row = {"mode": mode, "model_mb": model_mb, "per_site_mb": per_site, "link_s": link_s, "compute_s": compute,
                   "floor_s": floor, "ratio": measured["round_s"] / floor, "cores": cores} | measured  # fmt: skip
            if mode in unlinked:
                local = unlinked[mode]["round_s"]
                row |= {
                    "local_round_s": local,
                    "local_ratio": local / floor,
                    "link_added_s": measured["round_s"] - local,
                }
            rows.append(row)
    show(f"Rounds over a {args.site_mbit:g} Mbit/s, {args.delay_ms:g} ms site link into a {args.coord_mbit:g} Mbit/s "
         f"coordinator, {len(sites)} sites, a {model_mb:g} MB model",
         ["compression", "MB per site", "link s", "compute s", "floor s", "kit s/round", "kit / floor",
          "no link s/round", "no link / floor", "link added s"],
         [[r["mode"], r["per_site_mb"], r["link_s"], r["compute_s"], r["floor_s"], r["round_s"], r["ratio"],
           r.get("local_round_s"), r.get("local_ratio"), r.get("link_added_s")] for r in rows])  # fmt: skip

    def plot(ax: Any) -> None:
        labels = [r["mode"] for r in rows]
        ax.bar(labels, [r["round_s"] for r in rows], label="kit round", color="tab:blue")
        ax.scatter(labels, [r["floor_s"] for r in rows], color="black", zorder=3, label="floor")
        if all("local_round_s" in r for r in rows):
            ax.scatter(labels, [r["local_round_s"] for r in rows], color="tab:green", marker="s", zorder=3,
                       label="kit round, no link (this machine's processing)")  # fmt: skip
        ax.scatter(labels, [1.3 * r["floor_s"] for r in rows], color="tab:red", marker="_", s=400, zorder=3,
                   label="1.3x floor (target)")  # fmt: skip
        ax.set_ylabel("seconds per steady round")
        ax.set_title(f"{args.site_mbit:g} Mbit/s sites, {model_mb:g} MB model")
        ax.legend(fontsize=7)

    result = {"smoke": args.smoke, "model_mb": model_mb, "rounds": rounds, "sites": len(sites), "rows": rows,
              "site_mbit": args.site_mbit, "coord_mbit": args.coord_mbit, "delay_ms": args.delay_ms}  # fmt: skip
    write("wan", args.out, result, plot)
    return result


if __name__ == "__main__":
    main()
