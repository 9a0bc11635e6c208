"""A held-out test split the study can report: kept out of training and model selection, used once on the
final model, with 95% intervals (a bootstrap at each site, a Wilson interval from the pooled counts).

A site's test data is ``test_path`` in its site.toml (read by the task's ``load_data``, both of its
splits), or, with ``test_fraction`` in ``[run]``, a fixed share of its validation split (the same
examples in every round, chosen by the run's seed).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

HELD_OUT_KEY = "held-out-test"  # evaluate message config: evaluate on the test split, with intervals
TEST_PATH_KEY = "test-path"  # node config: the site's held-out test data
BOOTSTRAP_ROUNDS = 200
Z95 = 1.959963984540054


def split_off(validation: Any, fraction: float, seed: int) -> tuple[Any, Any]:
    """``validation`` without its held-out share, and that share (``fraction`` of it, fixed by ``seed``)."""
    import torch
    from torch.utils.data import Subset

    order = torch.randperm(len(validation), generator=torch.Generator().manual_seed(seed + 7919)).tolist()
    cut = max(1, round(len(order) * fraction)) if len(order) > 1 else 0
    return Subset(validation, sorted(order[cut:])), Subset(validation, sorted(order[:cut]))


def bootstrap(measure: Callable[[Any], dict[str, float]], data: Any, seed: int,
              rounds: int = BOOTSTRAP_ROUNDS) -> dict[str, tuple[float, float]]:  # fmt: skip
    """A 95% percentile interval of each metric ``measure`` gives, over ``rounds`` resamples of ``data``
    (drawn with replacement, fixed by ``seed``)."""
    import torch
    from torch.utils.data import Subset

    generator = torch.Generator().manual_seed(seed)
    draws: dict[str, list[float]] = {}
    for _ in range(rounds):
        picks = torch.randint(len(data), (len(data),), generator=generator).tolist()
        for name, value in measure(Subset(data, picks)).items():
            if math.isfinite(value):
                draws.setdefault(name, []).append(value)
    out = {}
    for name, values in draws.items():
        values.sort()
        lo = values[max(0, math.floor(0.025 * (len(values) - 1)))]
        hi = values[min(len(values) - 1, math.ceil(0.975 * (len(values) - 1)))]
        out[name] = (lo, hi)
    return out


def wilson(successes: float, n: float, z: float = Z95) -> tuple[float, float]:
    """The Wilson score interval of a proportion (95% by default); (nan, nan) without any trial."""
    if n <= 0:
        return math.nan, math.nan
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def pooled(per_site: dict[str, dict[str, float]]) -> dict[str, float]:
    """All sites' test figures as one: each metric's mean weighted by the sites' test examples, and
    accuracy's Wilson interval from the pooled counts (``test-accuracy-lo``, ``-hi``)."""
    sites = {s: m for s, m in per_site.items() if m.get("num-test", 0) > 0}
    total = sum(m["num-test"] for m in sites.values())
    if not total:
        return {}
    names = {k for m in sites.values() for k in m if k.startswith("test-") and not k.endswith(("-lo", "-hi"))}
    out = {"num-test": float(total)}
    for name in sorted(names):
        have = [(m[name], m["num-test"]) for m in sites.values() if name in m and math.isfinite(m[name])]
        weight = sum(n for _, n in have)
        if weight:
            out[name] = sum(v * n for v, n in have) / weight
    if "test-accuracy" in out:
        out["test-accuracy-lo"], out["test-accuracy-hi"] = wilson(out["test-accuracy"] * total, total)
    return out
