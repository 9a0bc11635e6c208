"""What the coordinator and the sites say to each other beyond Flower's own records.

One module for both sides, so that neither app imports the other (``clientapp`` and ``serverapp``
import this, never each other, and neither imports ``supernode``): the application error codes of a
reply, the keys of the kit's records, the task a run uses, and the marker of a site's own console
lines. Light on purpose (no torch; Flower only inside :func:`masked_digest`): the SuperLink's reply
tally and the supervisor read it too.
"""

from __future__ import annotations

import hashlib
import sys
from typing import TYPE_CHECKING, Any, cast

if TYPE_CHECKING:
    from flowerbed.config import RunSettings

# Application error codes of a reply (Flower's ``Error.code``).
PRIVACY_CODE = 4002  # the site's privacy budget is spent: it trains no more
REFUSED_CODE = 4003  # the site refused the run: its code is not approved there, or it breaks the site's policy

# The task a run uses when it names none: the built-in task of its model.
TASK_OF_MODEL = {"mlp": "tabular", "cnn": "images"}

# Secure aggregation (SecAgg+): keys of the train instructions and replies.
EXAMPLES_KEY = "flowerbed-examples"  # a site's example count, masked with its update
MAX_WEIGHT_KEY = "secagg-max-weight"  # the max_weight every site scales its update by
SECURE_ONLY_KEY = "secagg-required"  # a SuperNode's node config: the site trains only under secure aggregation
TRAIN_ARRAYS, TRAIN_CONFIG = "fitins.parameters", "fitins.config"  # Flower's legacy FitIns layout

# Federated feature standardization (flowerbed.scaling): the query before round 1, and its reply's record.
FEATURE_STATS_KEY = "feature-stats"  # a query's config: send the training split's per-feature sums
FEATURE_SUMS = "feature-sums"  # the reply's ConfigRecord: count, sum, sumsq

# CKKS encrypted aggregation (flowerbed.ckks): the queries before a round, and the records of messages.
CKKS_KEYS_KEY = "ckks-keys"  # a query's config: send this site's exchange public key and the CKKS keys it holds
CKKS_WRAP_KEY = "ckks-wrap"  # a query's config: make (key id "") or load the CKKS key, wrap it for the sites named
CKKS_RECORD = "ckks"  # config record: key id, maker, maker's exchange key; a reply's: exchange key, held keys
CKKS_WRAPPED = "ckks-wrapped"  # array record: the wrapped CKKS key (a message), or one per site (a wrap reply)
CKKS_PEERS = "ckks-peers"  # array record of a wrap query: each recipient site's exchange public key
COMPRESSION_DIR_KEY = "compression-dir"  # a SuperNode's node config: where compressed runs keep views, residuals
HE_DIR_KEY = "he-dir"  # a SuperNode's node config: where the site keeps its exchange key and CKKS keys

# The kit's site.toml of a SuperNode (its approvals), in the environment of its task processes.
SITE_FILE_ENV = "FLOWERBED_SITE_FILE"  # empty: no kit, built-in tasks only
DEVICE_ENV = "FLOWERBED_DEVICE"  # site.toml device: auto, cpu, cuda or cuda:N (flowerbed.clientapp.device)
# A reply's "site" record: the training split's classes (labels and counts) and when the site approved the task.
CLASS_LABELS, CLASS_COUNTS, APPROVED_AT = "class-labels", "class-counts", "approved-at"

# A site's own console: lines a task prints with this marker are shown and logged by its supervisor.
TASK_EVENT = "flowerbed-task:"


def task_name(settings: RunSettings) -> str:
    """The task a run uses: its ``task`` setting, else the built-in task of its ``model``."""
    return settings.task or TASK_OF_MODEL[settings.model]


def site_event(text: str) -> None:
    """A line for the site's own console: the SuperNode supervisor shows and logs every such line."""
    print(f"{TASK_EVENT} {text}", file=sys.stderr, flush=True)  # noqa: T201 - read by the supervisor


def masked_digest(reply: Any) -> tuple[int, str]:
    """Bytes and sha256 of the masked vector a site sent (what the ServerApp holds of its update)."""
    from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key

    if reply.has_error() or RECORD_KEY_CONFIGS not in reply.content.config_records:
        return 0, ""
    vectors = cast(list[bytes], reply.content.config_records[RECORD_KEY_CONFIGS].get(Key.MASKED_PARAMETERS, []))
    digest = hashlib.sha256()
    for chunk in vectors:
        digest.update(chunk)
    return sum(len(c) for c in vectors), digest.hexdigest()
