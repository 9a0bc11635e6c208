"""Site data loading: CSV and image folders, a fixed split, and messages naming path and problem."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from flowerbed.clientapp.data import DataError, load_site_data
from flowerbed.clientapp.task import evaluate, make_model, train


def load(path: Path, **kw: object) -> object:
    args: dict[str, object] = {"num_features": 2, "num_classes": 2, "image_size": 8,
                               "validation_fraction": 0.25, "seed": 1}  # fmt: skip
    args.update(kw)
    return load_site_data(str(path), **args)  # type: ignore[arg-type]


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_csv_split_is_fixed_by_seed(tmp_path: Path) -> None:
    rows = "\n".join(f"{i},{i * 2},{i % 2}" for i in range(40))
    csv = write(tmp_path / "d.csv", "a,b,target\n" + rows + "\n")
    first, second = load(csv), load(csv)
    assert len(first.train) == 30 and len(first.validation) == 10  # type: ignore[attr-defined]
    assert torch.equal(first.validation.tensors[0], second.validation.tensors[0])  # type: ignore[attr-defined]
    assert not torch.equal(first.validation.tensors[0], load(csv, seed=2).validation.tensors[0])  # type: ignore[attr-defined]
    assert load(tmp_path).kind == "csv"  # type: ignore[attr-defined]  # a folder with one CSV


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("a,b\n1,2\n", "no 'target' column"),
        ("a,b,target\n1,x,0\n", "line 2 has a non-numeric value"),
        ("a,b,target\n1,2\n", "line 2 has 2 fields, the header has 3"),
        ("a,b,target\n1,2,0.5\n", "target must be a class index"),
        ("a,b,c,target\n1,2,3,0\n1,2,3,1\n", "has 3 feature columns, the run expects 2"),
        ("a,b,target\n1,2,0\n1,2,5\n", "has class 5, the run expects 2 classes"),
        ("a,b,target\n", "needs a header row and at least one data row"),
    ],
)
def test_malformed_csv_names_path_and_problem(tmp_path: Path, content: str, message: str) -> None:
    csv = write(tmp_path / "site.csv", content)
    with pytest.raises(DataError) as info:
        load(csv)
    assert str(info.value).startswith(str(csv))
    assert message in str(info.value)


def test_missing_and_unset_paths(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        load(tmp_path / "nope")
    with pytest.raises(DataError, match="data-path is not set"):
        load_site_data("", num_features=2, num_classes=2, image_size=8, validation_fraction=0.2, seed=0)
    (tmp_path / "x.txt").write_text("hi")
    with pytest.raises(DataError, match="not a CSV file nor a folder"):
        load(tmp_path / "x.txt")


def test_image_folders_train_a_cnn(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    for label, (name, value) in enumerate((("benign", 30), ("malignant", 220))):
        (tmp_path / name).mkdir()
        for i in range(12):
            pixels = np.clip(rng.normal(value, 10, (10, 12, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(tmp_path / name / f"{label}-{i}.png")
    (tmp_path / "benign" / "notes.txt").write_text("ignored")
    data = load(tmp_path, num_features=None)
    assert data.kind == "images"  # type: ignore[attr-defined]
    assert data.train.tensors[0].shape[1:] == (3, 8, 8)  # type: ignore[attr-defined]
    torch.manual_seed(0)
    model = make_model("cnn", num_features=0, num_classes=2, hidden_units=8, image_size=8)
    train(model, data.train, epochs=15, batch_size=8, learning_rate=0.01)  # type: ignore[attr-defined]
    assert evaluate(model, data.validation).accuracy == 1.0  # type: ignore[attr-defined]


def images(root: Path, classes: dict[str, int]) -> Path:
    """Real PNG files: ``count`` images per class folder (0 makes an empty folder)."""
    for name, count in classes.items():
        (root / name).mkdir(parents=True)
        for i in range(count):
            Image.fromarray(np.full((4, 4, 3), 40 * i, dtype=np.uint8)).save(root / name / f"{i}.png")
    return root


def test_an_extra_class_folder_never_shifts_labels(tmp_path: Path) -> None:
    """An empty `0-unsorted/` would sort first and move every label by one: refused, or ignored by name."""
    site = images(tmp_path / "site", {"0-unsorted": 0, "benign": 3, "malignant": 3})
    with pytest.raises(DataError, match=r"has 3 class folders \(0-unsorted, benign, malignant\), the run expects 2"):
        load(site, num_features=None)
    named = load_site_data(str(site), num_features=None, num_classes=2, image_size=8, validation_fraction=0.2,
                           seed=0, class_names=["benign", "malignant"])  # fmt: skip
    labels = torch.cat([named.train.tensors[1], named.validation.tensors[1]])  # type: ignore[attr-defined]
    assert sorted(labels.tolist()) == [0, 0, 0, 1, 1, 1]
    # a site with only one of the classes keeps the run's labels
    only = images(tmp_path / "only", {"malignant": 4})
    one = load_site_data(str(only), num_features=None, num_classes=2, image_size=8, validation_fraction=0.25,
                         seed=0, class_names=["benign", "malignant"])  # fmt: skip
    assert set(torch.cat([one.train.tensors[1], one.validation.tensors[1]]).tolist()) == {1}  # type: ignore[attr-defined]
    # a folder of images that is not a class of the run is refused
    images(tmp_path / "site", {"atypical": 2})
    with pytest.raises(
        DataError, match=r"folder\(s\) atypical are not classes of this run \(class-names: benign, malignant\)"
    ):
        load_site_data(str(site), num_features=None, num_classes=2, image_size=8, validation_fraction=0.2,
                       seed=0, class_names=["benign", "malignant"])  # fmt: skip


def test_class_names_must_match_num_classes() -> None:
    from pydantic import ValidationError

    from flowerbed.config import RunSettings

    assert RunSettings.model_validate({"class_names": "benign, malignant"}).class_name_list() == ["benign", "malignant"]
    with pytest.raises(ValidationError, match="class_names must list num_classes=2 distinct names"):
        RunSettings.model_validate({"class_names": "a,b,c"})


def test_unreadable_image_is_named(tmp_path: Path) -> None:
    (tmp_path / "cls").mkdir()
    (tmp_path / "other").mkdir()
    (tmp_path / "cls" / "broken.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match=r"broken.png: not a readable image"):
        load(tmp_path, num_features=None)


def test_fedprox_term_keeps_weights_close(tmp_path: Path) -> None:
    rows = "\n".join(f"{i / 10},{-i / 10},{i % 2}" for i in range(40))
    data = load(write(tmp_path / "d.csv", "a,b,target\n" + rows + "\n"))

    def drift(mu: float) -> float:
        torch.manual_seed(0)
        model = make_model("mlp", num_features=2, num_classes=2, hidden_units=4, image_size=8)
        start = [p.detach().clone() for p in model.parameters()]
        train(model, data.train, epochs=20, batch_size=8, learning_rate=0.05, proximal_mu=mu)  # type: ignore[attr-defined]
        return float(sum(((p.detach() - s) ** 2).sum() for p, s in zip(model.parameters(), start, strict=True)))

    assert drift(10.0) < drift(0.0)


def test_small_grayscale_images_train_an_mlp_with_sgd(tmp_path: Path) -> None:
    """The digits demo's path: 8x8 grayscale PNG class folders, an MLP on the flattened pixels, SGD."""
    from flowerbed.clientapp.builtin import images
    from flowerbed.config import RunSettings

    rng = np.random.default_rng(0)
    for label in ("0", "1"):
        (tmp_path / label).mkdir()
        for n in range(20):
            pixels = rng.integers(0, 60, (8, 8), dtype=np.uint8) + (180 if label == "1" else 0)
            Image.fromarray(pixels.astype(np.uint8)).save(tmp_path / label / f"{n}.png")
    settings = RunSettings(task="images", model="mlp", image_size=8, image_channels=1, num_features=64,
                           hidden_units=16, num_classes=2, optimizer="sgd", learning_rate=0.1, batch_size=8,
                           local_epochs=5)  # fmt: skip
    train_data, validation = images.load_data(tmp_path, settings)
    assert train_data.tensors[0].shape[1:] == (1, 8, 8)  # type: ignore[attr-defined]
    model = images.model(settings)
    assert isinstance(model[1], torch.nn.Linear) and model[1].in_features == 64  # type: ignore[index]
    images.train(model, train_data, settings)
    assert images.evaluate(model, validation, settings)["accuracy"] == 1.0
    with pytest.raises(DataError, match=r"its images are 1 x 8 x 8 = 64 values, the run's MLP takes num_features = 30"):
        images.load_data(tmp_path, settings.model_copy(update={"num_features": 30}))
    rgb = images.load_data(tmp_path, settings.model_copy(update={"image_channels": 3, "num_features": 192}))[0]
    assert rgb.tensors[0].shape[1:] == (3, 8, 8)  # type: ignore[attr-defined]
