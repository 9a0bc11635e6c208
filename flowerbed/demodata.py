"""Offline, non-IID demo data from scikit-learn's bundled breast cancer data set (no download)."""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from flowerbed.errors import FlowerbedError

# Share of malignant (class 0) cases per site: label skew makes local-only models worse.
SITE_MALIGNANT_SHARE = (0.7, 0.1, 0.25)
SITE_SHARE = (0.4, 0.4, 0.2)  # the third site is small


@dataclass(frozen=True)
class DemoData:
    site_files: dict[str, Path]
    test_file: Path
    num_features: int


def load_breast_cancer_arrays() -> tuple[np.ndarray, np.ndarray]:
    """Features standardized with the whole set's statistics (an agreed preprocessing protocol)."""
    try:
        from sklearn.datasets import load_breast_cancer
    except ImportError:
        raise FlowerbedError(
            "the demo needs scikit-learn (it ships the data set): `pip install 'flowerbed[demo]'`"
        ) from None
    x, y = load_breast_cancer(return_X_y=True)
    x = (x - x.mean(axis=0)) / x.std(axis=0)
    return x.astype(np.float32), y.astype(np.int64)


def write_csv(path: Path, x: np.ndarray, y: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow([f"f{i}" for i in range(x.shape[1])] + ["target"])
        for row, target in zip(x, y, strict=True):
            writer.writerow([f"{v:.6f}" for v in row] + [int(target)])


def make_demo_data(out_dir: Path, sites: list[str], seed: int = 7, test_fraction: float = 0.25) -> DemoData:
    """A held-out test set plus one label-skewed CSV per site."""
    if len(sites) != len(SITE_SHARE):
        raise FlowerbedError(f"the demo data is made for {len(SITE_SHARE)} sites, got {len(sites)}")
    x, y = load_breast_cancer_arrays()
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(y))
    n_test = round(len(y) * test_fraction)
    test, pool = order[:n_test], order[n_test:]
    test_file = out_dir / "test.csv"
    write_csv(test_file, x[test], y[test])
    malignant = [i for i in pool if y[i] == 0]
    benign = [i for i in pool if y[i] == 1]
    files: dict[str, Path] = {}
    n_pool = len(pool)
    for site, share, mal_share in zip(sites, SITE_SHARE, SITE_MALIGNANT_SHARE, strict=True):
        size = round(n_pool * share)
        n_mal = min(len(malignant), round(size * mal_share))
        n_ben = min(len(benign), size - n_mal)
        idx = np.array(malignant[:n_mal] + benign[:n_ben])
        malignant, benign = malignant[n_mal:], benign[n_ben:]
        rng.shuffle(idx)
        files[site] = out_dir / site / "data.csv"
        write_csv(files[site], x[idx], y[idx])
    return DemoData(site_files=files, test_file=test_file, num_features=int(x.shape[1]))
