"""Flower's SecAgg+ workflow for the ServerApp (flwr 1.42 offers it only in its legacy server API).

Imported only when a run aggregates securely (:mod:`flowerbed.serverapp.secure` imports it, and the
round loop imports that module only then). A name that is gone raises HookError in one line.
"""

from __future__ import annotations

from flowerbed.flower import HookError, declare, unsupported

declare("flwr.server.compat.legacy_context", "LegacyContext", "run secure aggregation", path=False)
declare("flwr.server.workflow.constant", "MAIN_CONFIGS_RECORD", "run secure aggregation", path=False)
declare("flwr.server.workflow.constant", "MAIN_PARAMS_RECORD", "run secure aggregation", path=False)
declare("flwr.server.workflow.constant", "Key.CURRENT_ROUND", "run secure aggregation", path=False)
declare(
    "flwr.server.workflow.secure_aggregation.secaggplus_workflow", "SecAggPlusWorkflow", "run secure aggregation",
    "num_shares", "reconstruction_threshold", path=False,
)  # fmt: skip
declare(
    "flwr.server.workflow.secure_aggregation.secaggplus_workflow", "WorkflowState", "run secure aggregation",
    path=False,
)  # fmt: skip

try:
    from flwr.server.compat.legacy_context import LegacyContext
    from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD
    from flwr.server.workflow.constant import Key as WorkflowKey
    from flwr.server.workflow.secure_aggregation.secaggplus_workflow import SecAggPlusWorkflow, WorkflowState
except ImportError as exc:  # another Flower: said in one line, where secure aggregation is asked for
    raise HookError(unsupported("run secure aggregation", str(exc))) from None

__all__ = [
    "MAIN_CONFIGS_RECORD",
    "MAIN_PARAMS_RECORD",
    "LegacyContext",
    "SecAggPlusWorkflow",
    "WorkflowKey",
    "WorkflowState",
]
