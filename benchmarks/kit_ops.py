"""Benchmark 5, kit operations: certificates and startup kits for 10, 100 and 1,000 sites, with the CLI.

Each size in a fresh folder: ``flowerbed init`` (every site named), ``certs init``, ``certs server`` and
``kit build`` (node keys, signed... every kit as folder + one .tar.gz with the flowerbed wheel), each
timed as a user runs it (interpreter start included). The flowerbed wheel is built once beforehand and
passed with ``--wheel`` (a coordinator does the same; building it takes seconds once). Target: 1,000
kits in under 30 s. Writes docs/benchmarks/kit_ops.json and .png.

    python -m benchmarks.kit_ops [--sizes 10,100,1000] [--smoke] [--out DIR]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.common import OUT, show, write
from flowerbed.deploy.bundle import project_root, source_build_lock

CLI = [sys.executable, "-m", "flowerbed"]


def timed(args: list[str], cwd: Path) -> float:
    start = time.monotonic()
    out = subprocess.run([*CLI, *args], cwd=cwd, capture_output=True, text=True, check=False, timeout=3600)
    if out.returncode != 0:
        raise RuntimeError(f"flowerbed {' '.join(args[:2])} failed: {out.stdout[-400:]} {out.stderr[-400:]}")
    return time.monotonic() - start


def build_wheel(folder: Path) -> Path:
    """The flowerbed wheel from this tree, one build at a time (kit builds of tests share its build/ folder)."""
    root = project_root()
    assert root is not None, "benchmarks run from the source tree"
    with source_build_lock(root):
        subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                        str(folder), str(root)], check=True, capture_output=True, timeout=600)  # fmt: skip
    return next(folder.glob("flowerbed-*.whl"))


def one_size(root: Path, sites: int, wheel: Path) -> dict[str, Any]:
    fed = root / f"fed-{sites}"
    names = [f"site-{i:04d}" for i in range(sites)]
    phases = {"init": timed(["init", str(fed), "--superlink-address", "link.example.org",
                             *[a for n in names for a in ("--site", n)]], root)}  # fmt: skip
    phases["certs init"] = timed(["certs", "init", "-d", str(fed)], root)
    phases["certs server"] = timed(["certs", "server", "-d", str(fed)], root)
    phases["kit build"] = timed(["kit", "build", "-d", str(fed), "--wheel", str(wheel)], root)
    kits = sorted((fed / "kits").glob("*.tar.gz"))
    size_mb = sum(p.stat().st_size for p in (fed / "kits").rglob("*") if p.is_file()) / 2**20
    return {"sites": sites, "phases_s": phases, "total_s": sum(phases.values()), "kits": len(kits),
            "kits_mb_on_disk": round(size_mb, 1), "per_kit_ms": 1000 * phases["kit build"] / sites}  # fmt: skip


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="10,100,1000")
    parser.add_argument("--smoke", action="store_true", help="10 sites only (CI)")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)
    sizes = [10] if args.smoke else [int(s) for s in args.sizes.split(",")]
    rows = []
    with tempfile.TemporaryDirectory(prefix="fb-bench-kits-") as tmp:
        root = Path(tmp)
        wheel = build_wheel(root / "wheel")
        for sites in sizes:
            rows.append(one_size(root, sites, wheel))
    show("Certificates and kits (seconds, CLI as a user runs it)",
         ["sites", "init", "certs init", "certs server", "kit build", "total", "ms per kit", "kits on disk MB"],
         [[r["sites"], *[r["phases_s"][p] for p in ("init", "certs init", "certs server", "kit build")],
           r["total_s"], r["per_kit_ms"], r["kits_mb_on_disk"]] for r in rows])  # fmt: skip

    def plot(ax: Any) -> None:
        ax.plot([r["sites"] for r in rows], [r["total_s"] for r in rows], marker="o", label="init + certs + kits")
        ax.axhline(30, color="red", linestyle="--", linewidth=1, label="target for 1,000 kits: 30 s")
        ax.set_xscale("log")
        ax.set_xlabel("sites")
        ax.set_ylabel("seconds")
        ax.set_title("Certificates and startup kits")
        ax.legend()

    result = {"smoke": args.smoke, "rows": rows}
    write("kit_ops", args.out, result, plot)
    return result


if __name__ == "__main__":
    main()
