"""A site's Flower internals: the SuperNode's pull loop, its Fleet client, and the ClientApp runtime
behind the approval gate.

- ``start_client_internal``'s ``time`` and ``_push_messages``: a quick pull after each reply.
- ``FleetHttpClient``, ``NodeAuthHttpInterceptor``, ``DeactivateNodeRequest``, ``ActivateNodeRequest``:
  the supervisor signs a crashed node off and asks whether a node key is registered.
- ``run_clientapp.pull_task_input``, ``install_from_fab``, ``get_load_client_app_fn``: the approval gate
  decides from the pulled FAB before anything is unpacked or imported. ``ClientApp.__call__`` is
  guarded too (:func:`guard_clientapp_calls`): an app that reached its call by another route than the
  gate, or without the gate having decided, answers with the refusal (fail closed).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from flowerbed.flower import HookError, declare, entry, module, resolve, trace, traced_time, unsupported

PULL_LOOP_TIME = declare("flwr.supernode.start_client_internal", "time.sleep", "shorten the SuperNode's idle pull")
PUSH_MESSAGES = declare(
    "flwr.supernode.start_client_internal", "_push_messages", "shorten the SuperNode's idle pull after a reply"
)
NODE_STATE = declare(
    "flwr.supernode.nodestate.in_memory_nodestate", "InMemoryNodeState.__init__",
    "push a pulled message's reply that another run's reply left behind", path=False,
)  # fmt: skip
SUPERNODE_MAIN = declare("flwr.supernode.cli.flower_supernode", "flower_supernode", "start flower-supernode")
FLEET_CLIENT = declare(
    "flwr.supernode.fleet_http_client", "FleetHttpClient.from_server_address",
    "sign a crashed SuperNode off at the SuperLink", "interceptors", path=False,
)  # fmt: skip
NODE_AUTH = declare(
    "flwr.supernode.node_auth_http_interceptor", "NodeAuthHttpInterceptor", "sign a SuperNode's requests", path=False
)
DEACTIVATE = declare("flwr.proto.fleet_pb2", "DeactivateNodeRequest", "sign a crashed SuperNode off", path=False)
ACTIVATE = declare("flwr.proto.fleet_pb2", "ActivateNodeRequest", "ask whether a node key is registered", path=False)
PUBLIC_KEY_BYTES = declare(
    "flwr.supercore.primitives.asymmetric", "public_key_to_bytes", "ask whether a node key is registered", path=False
)
PULL_TASK = declare(
    "flwr.supernode.runtime.run_clientapp", "pull_task_input", "check a run's code before it is loaded", "client"
)
INSTALL_FAB = declare(
    "flwr.supernode.runtime.run_clientapp", "install_from_fab", "check a run's code before it is unpacked", "fab_file"
)
LOAD_APP = declare(
    "flwr.supernode.runtime.run_clientapp", "get_load_client_app_fn", "check a run's code before it is imported",
    "default_app_ref", "app_path", "multi_app",
)  # fmt: skip
CLIENTAPP_MAIN = declare("flwr.supernode.cli.flwr_clientapp", "flwr_clientapp", "run a ClientApp task")
CLIENTAPP_CALL = declare(
    "flwr.clientapp", "ClientApp.__call__", "refuse a ClientApp the approval gate did not allow", "message", "context"
)


def newest_pulled(state: Any) -> str | None:
    """The id of the message the SuperNode pulled last (its state keeps them in order), if still held.

    Flower 1.42 pushes after each pulled message whatever replies are ready, then deletes them with
    the messages they answer. A reply left from a run that stopped (its coordinator restarted while
    the site trained) answers that wait in place of the new message's; the new reply then waits for
    the next message, and the site is one round behind for ever (its replies time out).
    """
    store = getattr(state, "msg_store", None)
    lock = getattr(state, "lock_msg_store", None)
    if store is None or lock is None:
        return None
    with lock:
        pulled = [key for key, entry in store.items() if not entry.message.metadata.reply_to_message_id]
    return pulled[-1] if pulled else None


def holds(state: Any, message_id: str) -> bool:
    """Whether the SuperNode still holds ``message_id`` (its reply was not pushed)."""
    store = getattr(state, "msg_store", None)
    lock = getattr(state, "lock_msg_store", None)
    if store is None or lock is None:
        return False
    with lock:
        return message_id in store


def install_pull_clock(clock: Any, on_reply: Callable[[], None]) -> None:
    """The SuperNode's pull loop sleeps through ``clock`` (a ``time`` stand-in); ``on_reply`` after each push.

    The message just pulled is pushed once its reply is there, even when another (a stopped run's)
    reply answered Flower's wait first (:func:`newest_pulled`), not one message later.
    """
    loop = module(PUSH_MESSAGES)
    resolve(PULL_LOOP_TIME)
    push = resolve(PUSH_MESSAGES)
    source = inspect.getsource(resolve(NODE_STATE))
    if "self.msg_store" not in source or "self.lock_msg_store" not in source:
        raise HookError(unsupported(NODE_STATE.purpose, "InMemoryNodeState keeps no msg_store or lock_msg_store"))

    def push_and_mark(*args: Any, **kwargs: Any) -> None:
        trace(PUSH_MESSAGES)
        state = kwargs.get("state")
        pulled = newest_pulled(state)  # the message this turn of the loop pulled
        push(*args, **kwargs)
        for _ in range(3):  # a left-over reply answered the wait: wait for this message's own, and push it
            if pulled is None or not holds(state, pulled):
                break
            trace(NODE_STATE)
            push(*args, **kwargs)
        on_reply()

    loop.time = traced_time(PULL_LOOP_TIME, clock, clock.sleep)
    loop._push_messages = push_and_mark


def run_supernode() -> None:
    """Flower's own ``flower-supernode`` (it reads sys.argv)."""
    entry(SUPERNODE_MAIN)()


@contextmanager
def fleet_client(superlink: str, root_certificates: bytes, private_key: Any) -> Iterator[Any]:
    """Flower's Fleet API client (HTTP, TLS, the site's proxy settings), signing as ``private_key``'s node."""
    factory = resolve(FLEET_CLIENT)
    auth = resolve(NODE_AUTH)
    trace(FLEET_CLIENT)
    trace(NODE_AUTH)
    with factory(
        superlink, False, root_certificates, interceptors=[auth(private_key, private_key.public_key())]
    ) as client:
        yield client


def deactivate_node(client: Any, node_id: int) -> None:
    """Flower's ``DeactivateNode`` for ``node_id`` through a :func:`fleet_client`."""
    client.DeactivateNode(resolve(DEACTIVATE)(node_id=node_id))


def activate_node(client: Any, public_key: Any, heartbeat_interval: float) -> None:
    """Flower's ``ActivateNode`` for ``public_key`` through a :func:`fleet_client` (HTTP errors propagate)."""
    key_bytes = resolve(PUBLIC_KEY_BYTES)(public_key)
    client.ActivateNode(resolve(ACTIVATE)(public_key=key_bytes, heartbeat_interval=heartbeat_interval))


Wrap = Callable[[Any], Any]  # takes Flower's function, returns the one to run in its place


def install_gate(pull: Wrap, install: Wrap, loader: Wrap) -> None:
    """Wrap the three steps of Flower's ClientApp runtime; a step that is missing or changed raises HookError."""
    runtime = module(PULL_TASK)
    originals = [resolve(hook) for hook in (PULL_TASK, INSTALL_FAB, LOAD_APP)]
    for hook, original, wrap in zip(
        (PULL_TASK, INSTALL_FAB, LOAD_APP), originals, (pull, install, loader), strict=True
    ):
        wrapped = wrap(original)

        def traced(*args: Any, _wrapped: Any = wrapped, _hook: Any = hook, **kwargs: Any) -> Any:
            trace(_hook)
            return _wrapped(*args, **kwargs)

        setattr(runtime, hook.name, traced)


def guard_clientapp_calls(answer: Callable[[Any, Any, Any], Any]) -> None:
    """Every ``ClientApp`` call goes through ``answer(app, message, call)``, which calls ``call()`` or refuses.

    Whatever route a Flower version takes to load a ClientApp, running it is its ``__call__``
    (Flower's public class): the gate's last line of defence.
    """
    cls = module(CLIENTAPP_CALL)
    original = resolve(CLIENTAPP_CALL)

    def guarded(self: Any, message: Any, context: Any) -> Any:
        trace(CLIENTAPP_CALL)
        return answer(self, message, lambda: original(self, message, context))

    cls.__call__ = guarded


def clientapp_main() -> Callable[[], None]:
    """Flower's own ``flwr-clientapp`` entry (it reads sys.argv)."""
    return entry(CLIENTAPP_MAIN)


def preload_clientapp_runtime() -> None:
    """Import Flower's ClientApp runtime (the warm executor does, before it forks tasks)."""
    for hook in (CLIENTAPP_MAIN, PULL_TASK):
        resolve(hook)
