"""flowerbed: a deployment kit for Flower federations across locked-down workspace VMs."""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"
__all__ = ["Federation", "__version__"]


def __getattr__(name: str) -> Any:
    """``from flowerbed import Federation`` (the notebook API), imported only when asked for."""
    if name == "Federation":
        from flowerbed.notebook import Federation

        return Federation
    raise AttributeError(f"module 'flowerbed' has no attribute {name!r}")
