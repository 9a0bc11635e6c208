"""federation.toml validation: every invalid input names the file, the field and the reason."""

from __future__ import annotations

from pathlib import Path

import pytest

from flowerbed.config import (
    ConfigError,
    FederationConfig,
    RunSettings,
    load_federation,
    save_toml_model,
)
from tests.conftest import make_config


def test_round_trip(tmp_path: Path) -> None:
    config = make_config(target_value=0.9)
    save_toml_model(tmp_path / "federation.toml", config)
    assert load_federation(tmp_path) == config


def test_run_config_round_trip_uses_kebab_case() -> None:
    settings = RunSettings.model_validate({"strategy": "fedprox", "proximal_mu": 0.1, "max_rounds": 7})
    run_config = settings.to_run_config()
    assert run_config["max-rounds"] == 7
    assert "target-value" not in run_config  # None is left out
    back = RunSettings.from_run_config(run_config | {"output-dir": "/x"})
    assert back.model_dump() == settings.model_dump()
    assert back.sources() == settings.sources() == {"strategy": "federation.toml", "proximal_mu": "federation.toml",
                                                    "max_rounds": "federation.toml"}  # fmt: skip


@pytest.mark.parametrize(
    ("patch", "field", "reason"),
    [
        ({"sites": [{"name": "Inst A"}]}, "sites.0.name", "lower-case letters"),
        ({"sites": [{"name": "a"}, {"name": "a"}]}, "(file)", "repeated: a"),
        ({"superlink": {"address": "not a host!"}}, "superlink.address", "neither a DNS name"),
        ({"superlink": {"address": "x.org", "port": 70000}}, "superlink.port", "less than or equal"),
        ({"superlink": {"address": "x.org", "port": 9093}}, "superlink", "must differ"),
        ({"run": {"strategy": "fedprox"}}, "run", "proximal_mu > 0"),
        ({"run": {"strategy": "fedsgd"}}, "run.strategy", "fedavg"),
        ({"run": {"min_nodes": 5}}, "(file)", "only 1 sites"),
        ({"run": {"target_value": 3}}, "run", "(0, 1]"),
        ({"extra": 1}, "extra", "Extra inputs are not permitted"),
    ],
)
def test_invalid_federation_file(tmp_path: Path, patch: dict[str, object], field: str, reason: str) -> None:
    base: dict[str, object] = {"name": "fed", "superlink": {"address": "x.org"}, "sites": [{"name": "a"}]}
    base["run"] = {"min_nodes": 1}
    if "run" in patch:
        base["run"] = {"min_nodes": 1, **patch.pop("run")}  # type: ignore[dict-item]
    base.update(patch)
    import tomli_w

    (tmp_path / "federation.toml").write_text(tomli_w.dumps(base))
    with pytest.raises(ConfigError) as info:
        load_federation(tmp_path)
    path = str(tmp_path / "federation.toml")
    assert any(line.startswith(f"{path}: {field}:") and reason in line for line in info.value.details), (
        info.value.details
    )


def test_not_toml(tmp_path: Path) -> None:
    (tmp_path / "federation.toml").write_text("name = [unclosed")
    with pytest.raises(ConfigError, match="is not valid TOML"):
        load_federation(tmp_path)


def test_sans_keep_order_without_duplicates() -> None:
    config = FederationConfig.model_validate(
        {
            "name": "f",
            "superlink": {"address": "link.example.org", "sans": ["10.0.0.5", "link.example.org"]},
            "sites": [{"name": "a"}, {"name": "b"}],
        }
    )
    assert config.superlink.all_sans() == ["link.example.org", "10.0.0.5"]
