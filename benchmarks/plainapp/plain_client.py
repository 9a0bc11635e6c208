"""flowerbed's own ClientApp, for plain Flower and the simulation engine: same task, same data.

In the simulation a node has no ``data-path`` in its node config: it takes file ``partition-id`` of
the comma-separated BENCH_DATA_FILES, and the run config from BENCH_RUN_CONFIG.
"""

from __future__ import annotations

import json
import os

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from flowerbed.clientapp.app import train_handler

app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    if "data-path" not in context.node_config:
        files = os.environ["BENCH_DATA_FILES"].split(",")
        context.node_config["data-path"] = files[int(context.node_config["partition-id"])]
        context.run_config.update(json.loads(os.environ.get("BENCH_RUN_CONFIG", "{}")))
    return train_handler(msg, context)
