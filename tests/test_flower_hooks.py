"""The canary of Flower's internals: every hooked name exists as the kit expects, the kit's code reaches
Flower only through :mod:`flowerbed.flower`, and the approval gate fails closed.

That each hook is also *called* on the kit's path is proved by the federations that write a hook
trace (``FLOWERBED_HOOK_TRACE``): tests/test_approval.py (the gate, the SuperLink, the SuperNode and
the executors) and tests/test_secure.py (secure aggregation and the kit's round loop), with
:func:`traced` below.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import flwr
import pytest

from flowerbed import flower
from flowerbed.flower import HOOKS, Hook, HookError, arrays, check_all, compat, secagg, superexec, superlink, supernode

ROOT = Path(__file__).resolve().parent.parent
LIBRARY = ["certs", "superlink", "supernode", "serverapp", "clientapp", "deploy", "flowerbed"]
PUBLIC = ("flwr.app", "flwr.clientapp", "flwr.serverapp", "flwr.common")
INTERNAL = ("flwr.supercore", "flwr.supernode", "flwr.superlink", "flwr.server", "flwr.compat", "flwr.cli",
            "flwr.client", "flwr.proto", "flwr.simulation")  # fmt: skip
# Layers: an arrow here would point back up (the apps are peers; the SuperLink's stack knows no runner).
FORBIDDEN = {
    "clientapp": ("flowerbed.serverapp", "flowerbed.supernode"),
    "serverapp": ("flowerbed.clientapp",),
    "superlink": ("flowerbed.runner",),
}


def traced(path: Path) -> set[str]:
    """The hook keys that the processes of a federation wrote into ``FLOWERBED_HOOK_TRACE``'s file."""
    return set(path.read_text("utf-8").split()) if path.exists() else set()


def on_path(*modules: object) -> set[str]:
    """The keys of the hooks that ``modules`` (of :mod:`flowerbed.flower`) declare on every federation's path."""
    names = {m.__name__ for m in modules}  # type: ignore[attr-defined]
    return {h.key for h in HOOKS if h.path and h.owner in names}


def _imports(path: Path) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text("utf-8"))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found += [(node.lineno, node.module)] + [(node.lineno, f"{node.module}.{a.name}") for a in node.names]
        elif isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
    return found


def test_every_hooked_flower_name_exists_with_the_parameters_the_kit_passes() -> None:
    assert check_all() == [], f"Flower {flwr.__version__}"
    owners = {h.owner for h in HOOKS}
    assert owners == {m.__name__ for m in (superlink, supernode, superexec, compat, secagg, arrays)}, owners
    assert len(HOOKS) >= 30
    assert flwr.__version__.startswith(flower.SUPPORTED + ".")


def test_a_large_array_is_read_in_one_copy_of_its_chunks_with_the_same_bytes() -> None:
    """Flower's Array.inflate held the chunks, a growing bytearray and its bytes copy at once; the kit's holds
    the chunks and the joined bytes (one array less at the ServerApp per reply), and makes the same array."""
    import tracemalloc

    import numpy as np
    from flwr.app import Array
    from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects
    from flwr.supercore.inflatable.inflatable_utils import inflate_object_from_contents

    value = np.arange(6 * 2**20, dtype=np.float32)  # 24 MiB: 5 of Flower's chunks, one of them repeated below
    value[2**20 : 2 * 2**20] = value[3 * 2**20 : 4 * 2**20] = 0.0
    array = Array(value)
    size = len(array.data)

    def read() -> tuple[Array, int]:
        contents = {oid: obj.deflate() for oid, obj in get_all_nested_objects(array).items()}
        tracemalloc.start()
        try:
            out = inflate_object_from_contents(array.object_id, contents)
            return out, tracemalloc.get_traced_memory()[1]  # type: ignore[return-value]
        finally:
            tracemalloc.stop()

    original = Array.__dict__["inflate"]
    try:
        flowers, flowers_peak = read()
        arrays.inflate_arrays_in_one_copy()
        arrays.inflate_arrays_in_one_copy()  # a second install (a warm parent's fork) changes nothing
        ours, our_peak = read()
    finally:
        Array.inflate = original
    assert ours.data == flowers.data == array.data and ours.shape == array.shape and ours.dtype == array.dtype
    assert np.array_equal(ours.numpy(), value)
    assert our_peak < flowers_peak - 0.8 * size, (our_peak, flowers_peak, size)


def test_a_missing_or_changed_hook_is_refused_in_one_line_naming_the_flower_version() -> None:
    gone = Hook("flwr.supernode.runtime.run_clientapp", "load_everything", "check a run's code before it is imported")
    with pytest.raises(HookError) as missing:
        flower.resolve(gone)
    changed = Hook("flwr.supernode.runtime.run_clientapp", "pull_task_input", "check a run's code", ("fab_hash",))
    with pytest.raises(HookError) as renamed:
        flower.resolve(changed)
    for error in (missing.value, renamed.value):
        assert f"with Flower {flwr.__version__}" in error.message and "\n" not in error.message
        assert "pip install 'flwr>=1.42,<1.43'" in error.message
    assert "run_clientapp:load_everything is missing" in missing.value.message
    assert "pull_task_input takes no fab_hash" in renamed.value.message


def test_only_flowerbed_flower_reaches_flowers_internals_and_no_arrow_points_back_up() -> None:
    internal, layered = [], []
    for folder in LIBRARY:
        for path in sorted((ROOT / folder).rglob("*.py")):
            rel = path.relative_to(ROOT)
            if rel.parts[:2] == ("flowerbed", "flower"):
                continue
            for line, name in _imports(path):
                if name.startswith(INTERNAL) and not name.startswith(PUBLIC):
                    internal.append(f"{rel}:{line} {name}")
                for forbidden in FORBIDDEN.get(folder, ()):
                    if name == forbidden or name.startswith(forbidden + "."):
                        layered.append(f"{rel}:{line} {name}")
    assert internal == [], "Flower internals outside flowerbed/flower/:\n" + "\n".join(internal)
    assert layered == [], "imports back up the layers:\n" + "\n".join(layered)


def test_the_round_loop_imports_the_legacy_secagg_workflow_only_when_asked() -> None:
    """The kit's SecAgg+ half (and its door to Flower's legacy workflow) is imported by a secure round only.

    (flwr 1.42's own ``import flwr`` loads ``flwr.server``, legacy workflows included: Flower's choice.)
    """
    ours = ("flowerbed.serverapp.secure", "flowerbed.flower.secagg")
    probe = f"import sys, flowerbed.serverapp.loop, flowerbed.serverapp.app\nprint(sorted(m for m in sys.modules if m in {ours}))"
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, check=True)
    assert done.stdout.strip() == "[]", done.stdout
    probe = "import sys, flowerbed.serverapp.secure\nprint('flowerbed.flower.secagg' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, check=True)
    assert done.stdout.strip() == "True", done.stdout


GATE_PROBE = """
import json, sys
import flwr.supernode.runtime.run_clientapp as runtime
from flwr.app import Context, Message, Metadata, RecordDict
from flwr.clientapp import ClientApp
from flowerbed.supernode import gate

mode = sys.argv[1]
app = ClientApp()
app.train()(lambda msg, ctx: Message(RecordDict(), reply_to=msg))
if mode == "broken":  # a Flower without one of the steps the gate wraps
    del runtime.get_load_client_app_fn
    try:
        gate.main()
    except SystemExit as exc:
        said = str(exc.code)
else:  # the hooks are in place, but the app is called without the gate having decided
    said = ""
    from flowerbed.flower import supernode
    supernode.guard_clientapp_calls(gate.Gate().answer)
metadata = Metadata(run_id=1, message_id="m1", src_node_id=0, dst_node_id=1, reply_to_message_id="",
                    group_id="1", created_at=0.0, ttl=60.0, message_type="train")
msg = Message(RecordDict(), metadata=metadata)
reply = app(msg, Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={}))
print(json.dumps({"said": said, "error": reply.has_error(),
                  "code": reply.error.code if reply.has_error() else 0,
                  "reason": reply.error.reason if reply.has_error() else ""}))
"""


@pytest.mark.parametrize("mode", ["broken", "undecided"])
def test_the_gate_fails_closed(tmp_path: Path, mode: str) -> None:
    """A hook that cannot be installed, or an app called without the gate's decision: refused, Flower named."""
    script = tmp_path / "probe.py"
    script.write_text(GATE_PROBE)
    done = subprocess.run([sys.executable, str(script), mode], capture_output=True, text=True, timeout=120,
                          check=False, cwd=tmp_path)  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["error"] and result["code"] == 4003, result
    assert f"Flower {flwr.__version__}" in result["reason"], result
    if mode == "broken":
        assert (
            "get_load_client_app_fn is missing" in result["said"] and result["reason"] == f"refused: {result['said']}"
        )
        assert "REFUSED every run" in done.stderr
    else:
        assert "the approval gate did not see this run's code" in result["reason"]


CONTROL_PROBE = """
import sys
import flwr.proto.control_pb2 as control_pb2
from pathlib import Path
from flowerbed.errors import FlowerbedError
from flowerbed.superlink.control import ControlClient

if sys.argv[1] == "broken":  # a Flower without the Control API request the kit asks with
    del control_pb2.ListRunsRequest
try:
    ControlClient("127.0.0.1:9", Path(sys.argv[2])).run_status(1)
except FlowerbedError as exc:
    print(type(exc).__name__, exc.message)
"""


def test_a_missing_flower_internal_is_said_as_such_not_as_an_unanswering_superlink(tmp_path: Path) -> None:
    from flowerbed.certs.ca import CertificateAuthority

    ca = tmp_path / "ca.crt"
    ca.write_bytes(CertificateAuthority.create("probe").cert_pem)
    script = tmp_path / "probe.py"
    script.write_text(CONTROL_PROBE)
    said = {}
    for mode in ("broken", "intact"):
        done = subprocess.run([sys.executable, str(script), mode, str(ca)], capture_output=True, text=True,
                              timeout=120, check=True, cwd=tmp_path)  # fmt: skip
        said[mode] = done.stdout.strip()
    assert said["broken"].startswith("HookError flowerbed cannot ask the SuperLink's Control API"), said
    assert f"with Flower {flwr.__version__}" in said["broken"] and "did not answer" not in said["broken"]
    assert "the SuperLink's Control API did not answer" in said["intact"], said  # nothing listens on port 9


@pytest.mark.usefixtures("in_a_task")
def test_a_reply_a_stopped_run_left_behind_does_not_hold_back_the_next_messages() -> None:
    """Flower 1.42's SuperNode state after a coordinator restart mid-round: the message pulled last still
    waits for its reply to be pushed (seen in CI: a site answered every round one round late)."""
    from flwr.app import ConfigRecord, Message, RecordDict
    from flwr.supercore.object_store import ObjectStoreFactory
    from flwr.supernode.nodestate.in_memory_nodestate import InMemoryNodeState

    state = InMemoryNodeState(ObjectStoreFactory().store())
    assert supernode.newest_pulled(state) is None
    ids = []
    for n in (1, 2):  # a stopped run's message, never answered; then the message just pulled
        pulled = Message(RecordDict({"config": ConfigRecord({"n": n})}), dst_node_id=1, message_type="train")
        pulled.metadata.__dict__["_message_id"] = pulled.object_id
        state.store_message(pulled)
        ids.append(pulled.metadata.message_id)
    assert supernode.newest_pulled(state) == ids[1]  # the one whose reply the hook waits for
    assert supernode.holds(state, ids[1])  # its reply is not pushed yet: the hook pushes again
    state.delete_messages(message_ids=[ids[1]])
    assert not supernode.holds(state, ids[1]) and supernode.newest_pulled(state) == ids[0]
