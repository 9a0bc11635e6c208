"""Benchmark 3, model transfer: 10, 50 and 200 MB models, 2 sites, through the gateway.

For each size, in one sitting: the kit (TLS through nginx, node auth), the kit with its sites straight
at the SuperLink (one TLS hop, no gateway: what the site -> nginx -> SuperLink hop costs), plain Flower
1.42 with its defaults (``--insecure``, its state in memory), plain Flower with what the kit's SuperLink
must have (TLS with the kit's certificates, its state in an SQLite file; still no node auth, no
gateway), and the raw TLS throughput of this machine's loopback (Python's ssl, the kit's own
certificates, one connection). The smoke size runs the kit and plain Flower with TLS only. A round
moves the model to each site and back (4 x size for 2 sites); transfer seconds = steady round seconds
- the same round for a tiny model (the fixed cost) - the compute floor of that size; throughput =
bytes moved / transfer seconds. Goal: >= 0.25x raw TLS, measured next to each size (best of 3).
Writes docs/benchmarks/transfer.json and .png.

    python -m benchmarks.transfer [--sizes 10,50,200] [--rounds 3] [--smoke] [--out DIR]
"""

from __future__ import annotations

import argparse
import contextlib
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks import federations as fed
from benchmarks.common import OUT, median, show, write

RESOLUTION_S = 0.5
PARAMS_PER_HIDDEN = 33  # the tabular MLP: 30 features -> H hidden -> 2 classes


def hidden_for(mb: float) -> int:
    return max(8, int(mb * 2**20 / 4 / PARAMS_PER_HIDDEN))


SINK = """
import socket, ssl, sys
ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
ctx.load_cert_chain(sys.argv[1], sys.argv[2])
listener = socket.create_server(("127.0.0.1", 0))
print(listener.getsockname()[1], flush=True)
conn, _ = listener.accept()
expected, total = int(sys.argv[3]), 0
with ctx.wrap_socket(conn, server_side=True) as tls:
    while total < expected and (chunk := tls.recv(1 << 20)):
        total += len(chunk)
    tls.sendall(str(total).encode())
"""


def raw_tls_mb_s(cert: Path, key: Path, ca: Path, mb: int = 200) -> float:
    """One TLS connection on 127.0.0.1 to a sink in another process: ``mb`` MiB in 1 MiB writes, all read."""
    argv = [sys.executable, "-c", SINK, str(cert), str(key), str(mb << 20)]
    sink = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)
    try:
        assert sink.stdout is not None
        port = int(sink.stdout.readline())
        ctx = ssl.create_default_context(cafile=str(ca))
        ctx.check_hostname = False
        block = b"\x00" * (1 << 20)
        with socket.create_connection(("127.0.0.1", port)) as raw, ctx.wrap_socket(raw) as tls:
            start = time.monotonic()
            for _ in range(mb):
                tls.sendall(block)
            received = int(tls.recv(64))
            seconds = time.monotonic() - start
    finally:
        sink.kill()
        sink.wait(timeout=10)
    return received / 2**20 / seconds


def marginal_mb_s(rows: list[dict[str, Any]]) -> dict[str, float]:
    """4 x MB moved per round over the least-squares slope of round seconds against model MB (2+ sizes):
    what each further MB costs, free of the fixed cost of a round."""
    out: dict[str, float] = {}
    sizes = [r["model_mb"] for r in rows]
    if len(set(sizes)) < 2:
        return out
    mean_x = sum(sizes) / len(sizes)
    for name in ("kit", "direct", "plain", "plain_tls"):
        if f"{name}_round_s" not in rows[0]:
            continue
        ys = [r[f"{name}_round_s"] for r in rows]
        mean_y = sum(ys) / len(ys)
        slope = sum((x - mean_x) * (y - mean_y) for x, y in zip(sizes, ys, strict=True)) / sum(
            (x - mean_x) ** 2 for x in sizes
        )
        if slope > 0:
            out[name] = 4 / slope
    return out


def steady(values: list[float]) -> float:
    return median(values[1:] or values)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="10,50,200")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--smoke", action="store_true", help="a 2 MB model, 2 rounds (CI)")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)
    sizes, rounds = ([2.0], 2) if args.smoke else ([float(s) for s in args.sizes.split(",")], args.rounds)
    sites = fed.SITES[:2]
    rows = []
    with tempfile.TemporaryDirectory(prefix="fb-bench-transfer-") as tmp:
        root = Path(tmp)
        demo = fed.data(root / "data")
        with contextlib.ExitStack() as stack:
            kit = stack.enter_context(fed.kit(root / "kit", demo, sites=sites))
            targets: dict[str, Any] = {"kit": kit}
            if not args.smoke:  # the smoke size runs each kind of federation once: the kit, plain Flower with TLS
                targets["direct"] = stack.enter_context(fed.kit(root / "direct", demo, sites=sites, direct=True))
                targets["plain"] = stack.enter_context(fed.plain(root / "plain", demo, sites=2))
            targets["plain_tls"] = stack.enter_context(fed.plain(root / "plain-tls", demo, sites=2, tls=kit.layout))
            layout = kit.layout
            tiny = fed.settings(rounds, min_nodes=2, local_epochs=1, hidden_units=8)
            base = {name: steady(target.run(tiny, "tiny")) for name, target in targets.items()}
            for mb in sizes:
                settings = fed.settings(rounds, min_nodes=2, local_epochs=1, hidden_units=hidden_for(mb),
                                        round_timeout_s=1200)  # fmt: skip
                floor = min(fed.compute_floor(demo, settings, 2, sites=2))
                # Raw TLS next to each size (the best of 3): a busy moment would flatter the ratio.
                tries, tls_mb = (1, 20) if args.smoke else (3, 200)
                raw = max(raw_tls_mb_s(layout.server_cert, layout.server_key, layout.ca_cert, tls_mb)
                          for _ in range(tries))  # fmt: skip
                row: dict[str, Any] = {"model_mb": mb, "raw_tls_mb_s": raw, "compute_floor_s": floor}
                for name, target in targets.items():
                    seconds = steady(target.run(settings, f"{name}-{mb:g}"))
                    moving = seconds - base[name] - floor
                    row[f"{name}_round_s"] = seconds
                    # Below half a second the estimate is noise (plain Flower's rounds move in 3 s steps).
                    row[f"{name}_mb_s"] = 4 * mb / moving if moving > RESOLUTION_S else None
                    row[f"{name}_vs_raw"] = row[f"{name}_mb_s"] / raw if row[f"{name}_mb_s"] else None
                rows.append(row)
    if any("direct_round_s" in r for r in rows):
        show("The gateway's hop: the kit through nginx against its sites straight at the SuperLink",
             ["model MB", "through the gateway s/round", "straight s/round", "gateway's share", "straight MB/s"],
             [[r["model_mb"], r["kit_round_s"], r["direct_round_s"], 1 - r["direct_round_s"] / r["kit_round_s"],
               r["direct_mb_s"]] for r in rows])  # fmt: skip
    show(f"Model transfer, 2 sites (raw TLS on loopback: {max(r['raw_tls_mb_s'] for r in rows):.0f} MB/s)",
         ["model MB", "raw TLS MB/s", "kit s/round", "kit MB/s", "kit / raw TLS", "plain Flower s/round", "plain MB/s",
          "plain / raw TLS"],
         [[r["model_mb"], r["raw_tls_mb_s"], r["kit_round_s"], r["kit_mb_s"], r["kit_vs_raw"], r.get("plain_round_s"),
           r.get("plain_mb_s"), r.get("plain_vs_raw")] for r in rows])  # fmt: skip

    if any("plain_round_s" in r for r in rows):
        show("What TLS and a state file cost plain Flower: its defaults against TLS + SQLite, and the kit",
             ["model MB", "plain s/round", "plain, TLS + state file s/round", "kit s/round", "kit / plain",
              "kit / plain with TLS + state file"],
             [[r["model_mb"], r["plain_round_s"], r["plain_tls_round_s"], r["kit_round_s"],
               r["kit_round_s"] / r["plain_round_s"], r["kit_round_s"] / r["plain_tls_round_s"]]
              for r in rows])  # fmt: skip

    marginal = marginal_mb_s(rows)
    if marginal:
        raw = max(r["raw_tls_mb_s"] for r in rows)
        show("Marginal throughput (slope of round time over model size, all sizes)",
             ["configuration", "MB/s", "vs raw TLS"],
             [[name, value, value / raw] for name, value in marginal.items()])  # fmt: skip

    def plot(ax: Any) -> None:
        for key, marker, label in (("kit", "o", "kit, through the gateway"),
                                   ("plain", "s", "plain Flower, no gateway, no TLS"),
                                   ("plain_tls", "^", "plain Flower, TLS + state file")):  # fmt: skip
            points = [(r["model_mb"], r[f"{key}_mb_s"]) for r in rows if r.get(f"{key}_mb_s")]
            ax.plot([p[0] for p in points], [p[1] for p in points], marker=marker, label=label)
        quarter = max(r["raw_tls_mb_s"] for r in rows) * 0.25
        ax.axhline(quarter, color="red", linestyle="--", linewidth=1, label="0.25 x raw TLS")
        ax.set_xlabel("model MB")
        ax.set_ylabel("effective MB/s")
        ax.set_title("Model transfer (2 sites, each way)")
        ax.legend(fontsize=8)

    result = {"smoke": args.smoke, "rounds": rounds, "sites": 2, "tiny_round_s": base, "rows": rows,
              "marginal_mb_s": marginal}  # fmt: skip
    write("transfer", args.out, result, plot)
    return result


if __name__ == "__main__":
    main()
