"""Offline, non-IID demo data from data sets that ship inside scikit-learn (nothing is downloaded).

``digits`` (the default demo): 1,797 8x8 handwritten digits written as PNG class folders, 70/30
stratified into a pool and one held-out test set, the pool spread over 5 sites with Dirichlet
label skew (alpha 0.3, redrawn until every site has at least 10 images): most sites see only a few
digits, which is where federation pays. ``breast-cancer``: a CSV per site with label skew; nearly
linearly separable, so local-only models are already good there (the case where tabular data is
too easy to need federation).
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from flowerbed.errors import FlowerbedError

# Share of malignant (class 0) cases per site: label skew makes local-only models worse.
SITE_MALIGNANT_SHARE = (0.7, 0.1, 0.25)
SITE_SHARE = (0.4, 0.4, 0.2)  # the third site is small


DIGITS_ALPHA = 0.3
DIGITS_TEST_FRACTION = 0.3
DIGITS_MIN_PER_SITE = 10


@dataclass(frozen=True)
class DemoData:
    """The demo's data: each site's file or folder and the held-out test set."""

    site_files: dict[str, Path]  # each site's data: a CSV file or a folder of class folders
    test_file: Path  # the held-out test set every model is scored on (same kind)
    num_features: int


def _sklearn() -> Any:
    try:
        import sklearn.datasets
    except ImportError:
        raise FlowerbedError(
            "the demo needs scikit-learn (it ships the data sets): `pip install 'flowerbed[demo]'`"
        ) from None
    return sklearn


def dirichlet_split(
    labels: np.ndarray, sites: int, alpha: float, minimum: int, rng: np.random.Generator
) -> list[np.ndarray]:
    """Indices per site: each class spread over the sites by Dirichlet(alpha) shares, redrawn until
    every site has at least ``minimum`` examples (at most 1,000 draws)."""
    for _ in range(1000):
        parts: list[list[int]] = [[] for _ in range(sites)]
        for label in np.unique(labels):
            idx = np.flatnonzero(labels == label)
            rng.shuffle(idx)
            cuts = (np.cumsum(rng.dirichlet([alpha] * sites)) * len(idx)).astype(int)[:-1]
            for site, chunk in enumerate(np.split(idx, cuts)):
                parts[site].extend(chunk.tolist())
        if min(len(p) for p in parts) >= minimum:
            return [np.array(sorted(p)) for p in parts]
    raise FlowerbedError(f"no Dirichlet({alpha}) split gave every one of {sites} sites {minimum} examples")


def write_png_folders(root: Path, images: np.ndarray, labels: np.ndarray) -> None:
    """``root/CLASS/NNNN.png`` (8-bit grayscale), one sub-folder per class present."""
    from PIL import Image

    for n, (pixels, label) in enumerate(zip(images, labels, strict=True)):
        folder = root / str(int(label))
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).save(folder / f"{n:04d}.png")


def make_digits_data(out_dir: Path, sites: list[str], seed: int = 0) -> DemoData:
    """The digits demo: PNG class folders per site (label-skewed) and a held-out test folder."""
    sklearn = _sklearn()
    from sklearn.model_selection import train_test_split

    x, y = sklearn.datasets.load_digits(return_X_y=True)
    pixels = np.round(x.reshape(-1, 8, 8) * 255 / 16).astype(np.uint8)  # 0..16 -> an 8-bit image
    pool, test = train_test_split(np.arange(len(y)), test_size=DIGITS_TEST_FRACTION, stratify=y, random_state=seed)
    test_dir = out_dir / "test"
    write_png_folders(test_dir, pixels[test], y[test])
    rng = np.random.default_rng(seed)
    files: dict[str, Path] = {}
    for site, part in zip(sites, dirichlet_split(y[pool], len(sites), DIGITS_ALPHA, DIGITS_MIN_PER_SITE, rng),
                          strict=True):  # fmt: skip
        files[site] = out_dir / site
        write_png_folders(files[site], pixels[pool[part]], y[pool[part]])
    return DemoData(site_files=files, test_file=test_dir, num_features=64)


def load_breast_cancer_arrays(raw: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Features standardized with the whole set's statistics (an agreed preprocessing protocol), or
    ``raw``: as measured (areas in the thousands next to ratios below 0.1, as a clinic's export holds them)."""
    x, y = _sklearn().datasets.load_breast_cancer(return_X_y=True)
    if not raw:
        x = (x - x.mean(axis=0)) / x.std(axis=0)
    return x.astype(np.float32), y.astype(np.int64)


def make_raw_split(out_dir: Path, sites: list[str], seed: int = 7, test_fraction: float = 0.25) -> DemoData:
    """Raw (unscaled) breast-cancer features: a held-out test CSV and the rest in equal random shares,
    one CSV per site (the case federated standardization is for)."""
    x, y = load_breast_cancer_arrays(raw=True)
    order = np.random.default_rng(seed).permutation(len(y))
    n_test = round(len(y) * test_fraction)
    test_file = out_dir / "test.csv"
    write_csv(test_file, x[order[:n_test]], y[order[:n_test]])
    files: dict[str, Path] = {}
    for site, part in zip(sites, np.array_split(order[n_test:], len(sites)), strict=True):
        files[site] = out_dir / site / "data.csv"
        write_csv(files[site], x[part], y[part])
    return DemoData(site_files=files, test_file=test_file, num_features=int(x.shape[1]))


def write_csv(path: Path, x: np.ndarray, y: np.ndarray) -> None:
    """Write features ``x`` and labels ``y`` as a CSV with a header."""
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
