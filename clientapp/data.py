"""Load a site's local data: a CSV file (``target`` column + numeric features) or image folders."""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import TensorDataset

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff"}
TARGET = "target"


class DataError(Exception):
    """The site's data path is missing or malformed; the message names the path and the problem."""


@dataclass(frozen=True)
class SiteData:
    """A site's data split into train and validation sets (fixed by seed)."""

    train: TensorDataset
    validation: TensorDataset
    kind: str

    @property
    def num_train(self) -> int:
        """The number of training examples."""
        return len(self.train)


def read_csv(path: Path, num_features: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Features (float32) and integer targets from a CSV with a header and a ``target`` column."""
    try:
        with path.open(newline="", encoding="utf-8") as handle:
            rows = list(csv.reader(handle))
    except OSError as exc:
        raise DataError(f"{path}: cannot read ({exc.strerror})") from None
    except UnicodeDecodeError:
        raise DataError(f"{path}: not a UTF-8 text CSV file") from None
    if len(rows) < 2:
        raise DataError(f"{path}: needs a header row and at least one data row")
    header = [h.strip() for h in rows[0]]
    if TARGET not in header:
        raise DataError(f"{path}: no '{TARGET}' column (columns: {', '.join(header[:8])})")
    t_idx = header.index(TARGET)
    features, targets = [], []
    for line_no, row in enumerate(rows[1:], start=2):
        if not row:
            continue
        if len(row) != len(header):
            raise DataError(f"{path}: line {line_no} has {len(row)} fields, the header has {len(header)}")
        try:
            values = [float(v) for v in row]
        except ValueError:
            raise DataError(f"{path}: line {line_no} has a non-numeric value") from None
        target = values.pop(t_idx)
        if target != int(target) or target < 0:
            raise DataError(f"{path}: line {line_no}: target must be a class index 0, 1, ...")
        features.append(values)
        targets.append(int(target))
    x = np.asarray(features, dtype=np.float32)
    if num_features is not None and x.shape[1] != num_features:
        raise DataError(f"{path}: has {x.shape[1]} feature columns, the run expects {num_features} (num-features)")
    return x, np.asarray(targets, dtype=np.int64)


def _has_images(folder: Path) -> bool:
    return any(f.suffix.lower() in IMAGE_SUFFIXES for f in folder.iterdir())


def image_classes(root: Path, num_classes: int, class_names: list[str] | None) -> list[str]:
    """The label of each class folder, by a rule every site shares.

    With the run's ``class-names``, label i is the i-th name: a site may lack a class, and an empty
    extra folder is ignored, but a folder of images that is not a class of the run is refused.
    Without them, labels follow the sorted folder names, so a site must have exactly
    ``num-classes`` folders: one extra folder (even an empty ``0-unsorted/``) would shift every label.
    """
    found = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if class_names:
        unknown = [name for name in found if name not in class_names and _has_images(root / name)]
        if unknown:
            raise DataError(
                f"{root}: folder(s) {', '.join(unknown)} are not classes of this run "
                f"(class-names: {', '.join(class_names)}): move them out of the data folder"
            )
        return list(class_names)
    if len(found) != num_classes:
        raise DataError(
            f"{root}: has {len(found)} class folders ({', '.join(found) or 'none'}), the run expects "
            f"{num_classes} (num-classes); labels follow the sorted folder names, so every site needs the "
            "same folders: remove the extra ones, or name the classes with class-names in the run config"
        )
    return found


def read_image_folders(
    root: Path, image_size: int, *, num_classes: int, class_names: list[str] | None = None, channels: int = 3
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Images from ``root/CLASS/*.png`` resized to a square array, ``channels`` x side x side in [0, 1]
    (1: grayscale, 3: RGB); labels by :func:`image_classes`."""
    from PIL import Image, UnidentifiedImageError

    classes = image_classes(root, num_classes, class_names)
    images, labels = [], []
    for label, name in enumerate(classes):
        if not (root / name).is_dir():
            continue  # this site has no examples of that class
        for file in sorted((root / name).iterdir()):
            if file.suffix.lower() not in IMAGE_SUFFIXES:
                continue
            try:
                with Image.open(file) as img:
                    pixels = img.convert("L" if channels == 1 else "RGB").resize((image_size, image_size))
            except (OSError, UnidentifiedImageError):
                raise DataError(f"{file}: not a readable image") from None
            array = np.asarray(pixels, dtype=np.float32) / 255.0
            images.append(array[None] if channels == 1 else array.transpose(2, 0, 1))
            labels.append(label)
    if not images:
        raise DataError(f"{root}: no images found in class sub-folders ({', '.join(classes) or 'none'})")
    return np.stack(images), np.asarray(labels, dtype=np.int64), classes


def find_csv(path: Path) -> Path | None:
    """``path`` itself when it is a CSV file, or the single CSV inside a folder."""
    if path.is_file():
        return path if path.suffix.lower() == ".csv" else None
    found = sorted(path.glob("*.csv"))
    if len(found) > 1:
        raise DataError(f"{path}: holds {len(found)} CSV files; point data-path at one of them")
    return found[0] if found else None


def load_site_data(
    data_path: str,
    *,
    num_features: int | None,
    num_classes: int,
    image_size: int,
    class_names: list[str] | None = None,
    validation_fraction: float,
    seed: int,
    channels: int = 3,
) -> SiteData:
    """Load and split the data at ``data_path``; every problem raises :class:`DataError`."""
    if not data_path:
        raise DataError("data-path is not set in the SuperNode's node config")
    path = Path(data_path).expanduser()
    if not path.exists():
        raise DataError(f"{path}: does not exist")
    csv_file = find_csv(path)
    if csv_file is not None:
        x, y = read_csv(csv_file, num_features)
        kind = "csv"
    elif path.is_dir():
        x, y, _ = read_image_folders(
            path, image_size, num_classes=num_classes, class_names=class_names, channels=channels
        )
        kind = "images"
    else:
        raise DataError(f"{path}: not a CSV file nor a folder of class sub-folders")
    if int(y.max()) >= num_classes:
        raise DataError(f"{path}: has class {int(y.max())}, the run expects {num_classes} classes")
    if len(y) < 2:
        raise DataError(f"{path}: needs at least 2 samples, has {len(y)}")
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(y))
    n_val = max(1, round(len(y) * validation_fraction))
    val, train = order[:n_val], order[n_val:]
    return SiteData(
        train=TensorDataset(torch.from_numpy(x[train]), torch.from_numpy(y[train])),
        validation=TensorDataset(torch.from_numpy(x[val]), torch.from_numpy(y[val])),
        kind=kind,
    )
