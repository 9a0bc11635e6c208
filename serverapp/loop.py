"""The federated loop: train rounds until a convergence criterion, failing loudly on too few replies."""

from __future__ import annotations

import datetime as dt
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from logging import WARNING
from typing import Any, Protocol, cast

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from flowerbed import wire
from flowerbed.audit import ROUND, append_here
from flowerbed.config import BASELINE_KEY, RunSettings
from flowerbed.flower import compat, superexec
from flowerbed.heldout import HELD_OUT_KEY, pooled
from flowerbed.protocol import APPROVED_AT, CLASS_COUNTS, CLASS_LABELS, PRIVACY_CODE
from flowerbed.runfolder import (
    AWAY,
    FAILED,
    FINAL_EVAL,
    HELD_OUT,
    STOPPED,
    WAITING,
    History,
    RoundRow,
    stop_requested,
)
from flowerbed.serverapp.criteria import MAX_ROUNDS, PRIVACY_SPENT, STOP_ASKED, TIME_BUDGET, ConvergenceTracker
from flowerbed.serverapp.fold import Fold, folds
from flowerbed.serverapp.resume import ResumePoint
from flowerbed.serverapp.validate import NON_FINITE, Spec, non_finite_values, spec_of, update_problem

Clock = Callable[[], float]


class RunFailedError(Exception):
    """The run cannot go on (too few valid replies, nodes never connected)."""


@dataclass
class Outcome:
    """How a run ended."""

    stop_reason: str
    rounds: int
    best_round: int | None
    best_eval_loss: float | None
    best_eval_accuracy: float | None
    final_arrays: ArrayRecord
    privacy: dict[str, float] = field(default_factory=dict)  # site -> epsilon it spent (DP-SGD)


PULL_S, PULL_SLOW_S, PULL_RAMP_S = 0.2, 1.0, 60.0  # replies polled 5x a second, slowing to 1x over a minute


WATCH_S = 2.0  # how often an exchange asks whether a site it waits for was revoked or has gone dark
ONE_BY_ONE_BYTES = 16 << 20  # a model this big: its replies are pulled one per request, one held at a time
DARK_S = 25.0  # no contact for this long (a heartbeat is due every ~20 s, pulls every few seconds): dark
DARK_ROW_EVERY_S = 60.0


class Watch(Protocol):
    """The coordinator's view of the sites beyond Flower's replies (see ``serverapp.app.SiteWatch``)."""

    def revoked(self) -> dict[int, str]:
        """node id -> site, for the sites revoked by the coordinator."""
        ...

    def last_contact(self) -> dict[int, float]:
        """node id -> when the SuperLink last heard from it (epoch seconds)."""
        ...

    def registered(self) -> dict[int, str]:
        """node id -> site, for every site the coordinator registered."""
        ...


def pull_every(elapsed: float) -> float:
    """Seconds between two polls for replies ``elapsed`` seconds into an exchange: PULL_S at first (a quick
    round's replies come within seconds), growing to PULL_SLOW_S over PULL_RAMP_S (each poll costs the
    SuperLink a request; a reply to a long round waits at most a fraction of it)."""
    return min(PULL_SLOW_S, PULL_S + (PULL_SLOW_S - PULL_S) * elapsed / PULL_RAMP_S)


def exchange(
    grid: Grid,
    messages: list[Message],
    timeout: float,
    clock: Clock = time.monotonic,
    *,
    watch: Watch | None = None,
    dropped: dict[int, str] | None = None,
    on_dark: Callable[[int, float, float], None] | None = None,
    traffic: dict[str, int] | None = None,
    on_reply: Callable[[Message], Message] | None = None,
) -> list[Message]:
    """Flower's ``grid.send_and_receive``, polling for replies every 0.2 s (slowing to 1 s over a minute), not 3 s.

    flwr 1.42's HttpGrid sleeps 3 s between pulls (flwr/superlink/grid/http_grid.py), up to 3 s added
    to every exchange; this uses the same public ``push_messages``/``pull_messages``. ``watch``: a
    site revoked while the exchange waits for it is not waited for (Flower would only answer after
    minutes), its node goes into ``dropped`` with the reason; a site with no contact for ``DARK_S``
    is passed to ``on_dark(node, seconds since its last contact, seconds the round still waits)``. The
    messages go out packed, one flat array each (:mod:`flowerbed.wire`), and the replies come back
    unpacked; the messages passed keep their content. ``traffic`` adds up the packed bytes sent
    ("down", one copy per site) and received ("up"). ``on_reply``: each reply, unpacked, as it arrives
    (returns what is kept of it: a folded update lets its arrays go). Flower's ``pull_messages`` hands
    back every ready reply at once, in memory together: for a model of ``ONE_BY_ONE_BYTES`` or more the
    replies are pulled one per request (one loopback request per waiting site and poll), so that the
    ServerApp holds one update at a time beside its running sum.
    """
    kept = [(m, m.content) for m in messages if m.has_content()] if wire.enabled() else []
    packed: dict[int, RecordDict] = {}  # the same model to every site: packed once (and one blob in memory)
    try:
        for message, content in kept:
            if id(content) not in packed:
                packed[id(content)] = wire.pack(content)
            message.content = packed[id(content)]
            if traffic is not None:
                traffic["down"] = traffic.get("down", 0) + wire.size(message.content)
        waiting = set(grid.push_messages(messages))
    finally:
        for message, content in kept:
            message.content = content
    node_of = {m.metadata.message_id: m.metadata.dst_node_id for m in messages}  # ids are set by the push
    one_by_one = max(map(wire.size, packed.values()), default=0) >= ONE_BY_ONE_BYTES
    packed.clear()  # pushed: the packed copy of the model is not held while the replies come in
    start = clock()
    next_check = start + WATCH_S
    replies: list[Message] = []
    while waiting:
        for batch in [[m] for m in sorted(waiting)] if one_by_one else [list(waiting)]:
            with superexec.object_pull_deadline(max(timeout - (clock() - start), PULL_S)):  # a cut upload: not 180 s
                got = list(grid.pull_messages(batch))
            if traffic is not None:
                traffic["up"] = traffic.get("up", 0) + sum(wire.size(m.content) for m in got if m.has_content())
            waiting -= {m.metadata.reply_to_message_id for m in got}
            while got:  # one reply at a time, each packed blob let go once read
                reply = wire.unpack_message(got.pop(0))
                replies.append(on_reply(reply) if on_reply is not None else reply)
        elapsed = clock() - start
        if watch is not None and waiting and clock() >= next_check:
            next_check = clock() + WATCH_S
            gone = watch.revoked()
            for message_id in [m for m in waiting if node_of.get(m) in gone]:
                waiting.discard(message_id)  # named below
            contacts = watch.last_contact() if on_dark is not None else {}
            for node in {node_of.get(m) for m in waiting} & set(contacts):
                age = time.time() - contacts[node]  # type: ignore[index]
                if age >= DARK_S and on_dark is not None and node is not None:
                    on_dark(node, age, timeout - elapsed)
        if not waiting or elapsed >= timeout:
            break
        time.sleep(min(pull_every(elapsed), timeout - elapsed))
    if watch is not None and dropped is not None:  # Flower's own error replies for a revoked node, named
        gone = watch.revoked()
        for node in set(node_of.values()) & set(gone):
            dropped.setdefault(node, f"site {gone[node]} was revoked by the coordinator (`flowerbed certs revoke`); "
                               "dropped from this round")  # fmt: skip
    return replies


def wait_for_nodes(grid: Grid, settings: RunSettings, clock: Clock = time.monotonic) -> int:
    """Wait until ``min_nodes`` SuperNodes are connected, at most ``node_wait_s``."""
    end = clock() + settings.node_wait_s
    while True:
        connected = len(list(grid.get_node_ids()))
        if connected >= settings.min_nodes:
            return connected
        if clock() >= end:
            raise RunFailedError(
                f"only {connected} of min-nodes={settings.min_nodes} SuperNodes connected within "
                f"{settings.node_wait_s:.0f} s: check that the sites run `flowerbed supernode start`"
            )
        time.sleep(1)


class NodeSnapshot:
    """The grid with its node list read once, for one ``configure_train``/``configure_evaluate`` call.

    Flower's strategies read the connected nodes twice (a sample size, then ``sample_nodes``, which
    waits without end until that many are connected): a node that leaves between the two reads (a site
    revoked, a SuperNode gone) would hang the round. Every other attribute is the grid's.
    """

    def __init__(self, grid: Grid) -> None:
        self._grid = grid
        self.nodes = list(grid.get_node_ids())

    def get_node_ids(self) -> list[int]:
        """The node ids read when the snapshot was taken."""
        return list(self.nodes)

    def __getattr__(self, name: str) -> object:
        return getattr(self._grid, name)

    def grid(self) -> Grid:
        """This snapshot, typed as the grid it stands for."""
        return cast(Grid, self)


class SiteNames:
    """Which site each node id is, so that every message about a node names its site.

    A site's ClientApp puts its ``site-name`` (from the SuperNode's node config) into each reply;
    an error reply that Flower itself made (e.g. Node Unavailable) comes from the SuperLink, so the
    node is found through the message it answers.
    """

    def __init__(self, registered: dict[int, str] | None = None) -> None:
        self.by_node: dict[int, str] = {}
        self.registered = dict(registered or {})  # the coordinator's registry: names a node before it replied

    def learn(self, node_id: int, reply: Message) -> None:
        """Note the site name a reply carries for its node id."""
        if reply.has_error():
            return
        for record in reply.content.config_records.values():
            site = record.get("site-name")
            if isinstance(site, str) and site:
                self.by_node[node_id] = site

    def absent_from(self, present: set[int]) -> list[str]:
        """The sites seen in this run whose node is no longer connected."""
        return [self.name(node) for node in self.by_node if node not in present]

    def name(self, node_id: int) -> str:
        """``site NAME (node ID)`` when the node's site is known, else ``node ID``."""
        site = self.by_node.get(node_id) or self.registered.get(node_id)
        return f"site {site} (node {node_id})" if site else f"node {node_id} (site not known yet)"


# Flower's own error codes for a node that is not there (flwr.common.constant.ErrorCode): waiting helps.
ABSENT_CODES = {3, 4, 5}
WAITING_ROW_EVERY_S = 60.0  # MESSAGE_UNAVAILABLE, REPLY_MESSAGE_UNAVAILABLE, NODE_UNAVAILABLE


@dataclass
class Replies:
    """One exchange's outcome: the valid replies, an error line per failure, and who was absent."""

    valid: list[Message]
    errors: list[str]
    absent: list[str]  # site labels whose node was unavailable or did not answer in time
    sites: list[str] = field(default_factory=list)  # the sites of the valid replies (unknown ones by node id)
    retired: dict[int, str] = field(default_factory=dict)  # node -> its refusal: its privacy budget is spent
    privacy: dict[str, float] = field(default_factory=dict)  # site -> epsilon spent, from the valid replies
    heads: dict[str, str] = field(default_factory=dict)  # site -> its audit trail's head after this task
    code: dict[str, str] = field(default_factory=dict)  # site -> digest of the own task's files it imported
    examples: dict[str, int] = field(default_factory=dict)  # site -> the examples its reply was made on
    sites_unsorted: list[str] = field(default_factory=list)  # the site of each valid reply, in their order
    masked: dict[str, str] = field(default_factory=dict)  # secure aggregation: site -> its masked vector's sha256
    classes: dict[str, dict[str, int]] = field(default_factory=dict)  # site -> its training split's class counts
    approved: dict[str, str] = field(default_factory=dict)  # site -> when it approved the own task (its site.toml)
    traffic: dict[str, int] = field(default_factory=dict)  # packed bytes: "down" to all sites, "up" from them
    fold: Fold | None = None  # the valid updates' running sum (their replies hold no arrays any more)

    @property
    def data_errors(self) -> bool:
        """Whether a site failed for another reason than being away or out of privacy budget."""
        return len(self.errors) > len(self.absent) + len(self.retired)


def split_replies(
    messages: list[Message], replies: list[Message], sites: SiteNames, dropped: dict[int, str] | None = None
) -> Replies:
    """One exchange's replies sorted out: the valid ones with what they carry, a line per failure naming
    its site, the absent sites, and the sites out of privacy budget (``dropped``: revoked nodes, and why)."""
    dst = {m.metadata.message_id: m.metadata.dst_node_id for m in messages}
    out = Replies([], [], [])
    for reply in replies:
        node_id = dst.get(reply.metadata.reply_to_message_id, reply.metadata.src_node_id)
        sites.learn(node_id, reply)
        if reply.has_error() and dropped and node_id in dropped:  # revoked: gone for good, not away
            out.errors.append(dropped[node_id])
        elif reply.has_error():
            reason = str(reply.error.reason)
            who = sites.name(node_id)
            # Our ClientApp's own errors already start with "site NAME:"; Flower's do not.
            out.errors.append(reason if reason.startswith("site ") else f"{who}: {reason}")
            if reply.error.code in ABSENT_CODES:
                out.absent.append(who)
            elif reply.error.code == PRIVACY_CODE:
                out.retired[node_id] = reason
        else:
            out.valid.append(reply)
            site = sites.by_node.get(node_id, f"node {node_id}")
            out.sites.append(site)
            out.sites_unsorted.append(site)
            record = reply.content.config_records.get("site")
            if record is not None and record.get("audit-head"):
                out.heads[site] = str(record["audit-head"])
            if record is not None and record.get("code-sha256"):
                out.code[site] = str(record["code-sha256"])
            if record is not None and record.get(APPROVED_AT):
                out.approved[site] = str(record[APPROVED_AT])
            if record is not None and record.get(CLASS_LABELS):
                labels, counts = record[CLASS_LABELS], record.get(CLASS_COUNTS, [])
                out.classes[site] = {str(k): int(v) for k, v in zip(labels, counts, strict=False)}  # type: ignore[call-overload, arg-type]
            metrics = reply.content.metric_records.get("metrics")
            if metrics is not None and isinstance(metrics.get("num-examples"), int | float):
                out.examples[site] = int(metrics["num-examples"])  # type: ignore[arg-type]
            spent = reply.content.config_records.get("privacy")
            if spent is not None and isinstance(spent.get("epsilon"), float):
                out.privacy[site] = round(float(spent["epsilon"]), 4)  # type: ignore[arg-type]
    out.sites.sort()
    answered = {dst.get(r.metadata.reply_to_message_id) for r in replies}
    for node in dst.values():
        if node in answered:
            continue
        if dropped and node in dropped:  # not absent: gone for good, never waited for
            out.errors.append(dropped[node])
            continue
        out.errors.append(f"{sites.name(node)}: no reply before round-timeout-s")
        out.absent.append(sites.name(node))
    return out


def screen(got: Replies, expected: Spec, current: ArrayRecord, max_update_norm: float | None) -> Replies:
    """``got`` without the replies whose update may not be aggregated, each dropped with a line naming its site.

    ``expected``: the task's model as built (names, shapes, dtypes); ``current``: the global model sent.
    """
    keep: list[Message] = []
    kept_sites: list[str] = []
    for reply, site in zip(got.valid, got.sites_unsorted, strict=True):
        problem = (got.fold.problem(reply) if got.fold is not None
                   else update_problem(reply, expected, max_update_norm, current))  # fmt: skip
        if problem is None:
            keep.append(reply)
            kept_sites.append(site)
        else:
            got.errors.append(f"site {site}: {problem}; dropped")
            compat.log(WARNING, "site %s: %s; dropped from this round", site, problem)
    got.valid, got.sites_unsorted, got.sites = keep, kept_sites, sorted(kept_sites)
    return got


def all_metrics(metrics: MetricRecord | None) -> dict[str, float]:
    """Every aggregated metric by name (``train-*``, ``eval-*``), without the example counts."""
    if metrics is None:
        return {}
    return {k: float(v) for k, v in metrics.items() if k != "num-examples" and isinstance(v, int | float)}


Pool = Callable[[list[dict[str, float]]], dict[str, float]]  # each site's statistics -> pooled metrics


def sums_of(replies: list[Message]) -> list[ConfigRecord | None]:
    """The statistics each reply sent for the task's pooled metrics (its ``sums`` record; None: none)."""
    return [reply.content.config_records.get("sums") for reply in replies]


def pooled_metrics(pool: Pool | None, sums: list[ConfigRecord | None]) -> dict[str, float]:
    """The task's pooled evaluation metrics (``eval-NAME``) from the statistics every reply sent:
    computed as if the sites' data were one; empty when the task pools none, or a reply lacks them."""
    if pool is None or not sums or any(s is None for s in sums):
        return {}
    each = [{k: float(v) for k, v in s.items() if isinstance(v, int | float)} for s in sums if s is not None]
    return {f"eval-{name}": value for name, value in pool(each).items()}


def eval_metrics(metrics: MetricRecord | None) -> dict[str, float]:
    """The evaluation metrics of the global model by the task's own names (``auroc``, ``loss`` ...)."""
    return {k.removeprefix("eval-"): v for k, v in all_metrics(metrics).items() if k.startswith("eval-")}


def _metric(metrics: MetricRecord | None, key: str) -> float | None:
    if metrics is None or key not in metrics:
        return None
    return float(metrics[key])  # type: ignore[arg-type]


@dataclass(frozen=True)
class FinalEval:
    """The last model's own evaluation."""

    loss: float
    accuracy: float | None
    metrics: dict[str, float]
    per_site: dict[str, dict[str, float]] = field(default_factory=dict)  # each site's own metrics
    pooled: list[str] = field(default_factory=list)  # the metrics computed from the sites' pooled statistics


@dataclass
class BestModel:
    """The best evaluated model that was trained (the initial model never counts): one model in memory."""

    round: int | None = None
    loss: float | None = None
    accuracy: float | None = None
    arrays: ArrayRecord | None = None

    def offer(
        self, server_round: int, loss: float, accuracy: float | None, arrays: ArrayRecord, min_delta: float
    ) -> bool:
        """Keep this round's model when its loss beats the best by ``min_delta``; True when kept."""
        if not math.isfinite(loss):  # a model whose loss is NaN or infinite is never the best
            return False
        if self.loss is None or loss < self.loss - min_delta:
            self.round, self.loss, self.accuracy, self.arrays = server_round, loss, accuracy, arrays
            return True
        return False


@dataclass
class DarkSites:
    """Names a site that has gone dark while a round waits for it: an ``away`` row, at most once a minute."""

    history: History
    sites: SiteNames
    watch: Watch | None
    said: dict[int, float] = field(default_factory=dict)

    def noted(self, server_round: int) -> Callable[[int, float, float], None]:
        """The callback that writes an ``away`` row for a node gone dark in ``server_round``."""

        def on_dark(node: int, age: float, left: float) -> None:
            if time.monotonic() - self.said.get(node, -math.inf) < DARK_ROW_EVERY_S:
                return
            self.said[node] = time.monotonic()
            last = dt.datetime.fromtimestamp(time.time() - age, dt.UTC).strftime("%H:%M:%S UTC")
            line = (f"{self.sites.name(node)}: no contact for {age:.0f} s (last {last}); round {server_round} "
                    f"waits for it {max(left, 0):.0f} s more (round-timeout-s)")  # fmt: skip
            self.history.append(RoundRow(server_round, 0, 0, None, None, None, 0.0, line, [line], kind=AWAY))

        return on_dark

    def silent_for(self) -> dict[str, float]:
        """Site label -> seconds since its last contact, for every node the contact log knows."""
        contacts = self.watch.last_contact() if self.watch is not None else {}
        return {self.sites.name(node): time.time() - at for node, at in contacts.items()}


@dataclass
class Absence:
    """Since when each absent site has been away (monotonic seconds), from its last contact where known."""

    since: dict[str, float]

    def update(self, absent: list[str], now: float, silent_for: dict[str, float] | None = None) -> None:
        """``silent_for``: site label -> seconds since the SuperLink last heard from it (its contact log)."""
        for name in absent:
            self.since.setdefault(name, now - max((silent_for or {}).get(name, 0.0), 0.0))
        for name in [n for n in self.since if n not in absent]:
            del self.since[name]

    def describe(self, now: float) -> str:
        """Each absent site with how long it has been away, for a row or an error."""
        return ", ".join(f"{name} away {now - t:.0f} s" for name, t in sorted(self.since.items()))

    def longest(self, now: float) -> float:
        """Seconds the longest absent site has been away (0 when none is)."""
        return max((now - t for t in self.since.values()), default=0.0)


def audit_round(history: History, row: RoundRow, heads: dict[str, str], masked: dict[str, str] | None = None) -> None:
    """The coordinator's audit event of a round: who took part, who failed, each site's trail head
    (and under secure aggregation the sha256 of each masked update, all the ServerApp held of it)."""
    extra = {"masked_updates": masked} if masked else {}
    append_here(ROUND, "serverapp", run=history.out_dir.name, round=row.round, kind=row.kind, sites=row.sites,
                errors=row.errors, epsilon=row.privacy, site_audit_heads=heads, **extra)  # fmt: skip


Aggregate = tuple[ArrayRecord | None, MetricRecord | None]


def secure_exchange(
    grid: Grid, messages: list[Message], arrays: ArrayRecord, *, server_round: int, settings: RunSettings,
    sites: SiteNames, clock: Clock = time.monotonic,
) -> tuple[Replies, Aggregate]:  # fmt: skip
    """One round under SecAgg+ (:mod:`flowerbed.serverapp.secure`): the replies as for a plain round
    (each stage's failures named by site) and the new global model with the sites' metrics (in clear)."""
    from flowerbed.serverapp.secure import inspect_round, secure_round  # Flower's legacy workflow: only now

    config = messages[0].content.config_records.get("config") if messages else None
    nodes = [m.metadata.dst_node_id for m in messages]
    result = secure_round(lambda sent, timeout: exchange(grid, sent, timeout, clock), nodes, arrays,
                          config=config or ConfigRecord(), server_round=server_round, settings=settings)  # fmt: skip
    inspect_round(result, server_round, settings.secagg_inspect)
    train = result.train
    got = split_replies(train.messages, train.replies, sites) if train is not None else Replies([], [], [])
    for part in result.exchanges:
        if part is train:
            continue
        other = split_replies(part.messages, part.replies, sites)
        # a site that failed a key stage is named once, at the first stage it failed
        named = {e.partition(":")[0] for e in got.errors}
        got.errors += [e for e in other.errors if e.partition(":")[0] not in named]
        got.absent += [a for a in other.absent if a not in got.absent]
    if result.arrays is None:
        compat.log(WARNING, "round %s: %s", server_round, result.halted)
        if not got.errors:  # nobody was away or out of budget: the protocol itself failed
            got.errors.append(f"{result.halted}")
        got.valid, got.sites, got.sites_unsorted, got.heads = [], [], [], {}
        return got, (None, None)
    answered = {r.metadata.src_node_id for r in got.valid}
    got.masked = {sites.by_node.get(node, f"node {node}"): sha for node, (_, sha) in result.received.items()
                  if node in answered}  # fmt: skip
    records = [RecordDict({"metrics": r.content.metric_records["metrics"]}) for r in got.valid]
    metrics = compat.aggregate_metricrecords(records, "num-examples") if records else None
    return got, (result.arrays, metrics)


@dataclass
class RoundState:
    """What the round loop carries from round to round."""

    settings: RunSettings
    history: History
    tracker: ConvergenceTracker
    sites: SiteNames
    dark: DarkSites
    arrays: ArrayRecord
    start: float
    server_round: int = 0
    best: BestModel = field(default_factory=BestModel)
    absence: Absence = field(default_factory=lambda: Absence({}))
    last_waiting_row: float = -math.inf
    retired: dict[int, str] = field(default_factory=dict)  # node -> why it trains no more (privacy budget spent)
    spent: dict[str, float] = field(default_factory=dict)  # site -> epsilon spent so far
    pool: Pool | None = None  # the task's pooled metrics from the sites' statistics (None: it pools none)
    carried: list[str] = field(default_factory=list)  # said of sites before round 1 (revoked while asked): its row's
    ckks: Any = None  # CKKS: the run's keyring (flowerbed.serverapp.ckks.Keyring), None for other runs
    broadcast: Any = None  # compression: the view and its holders (flowerbed.serverapp.compression.Broadcast)
    replayed: str | None = None  # a resumed run: what its replayed history says of target and plateau


def start_rounds(
    initial: ArrayRecord, settings: RunSettings, history: History, start: float, *, resume: ResumePoint | None,
    watch: Watch | None,
) -> RoundState:  # fmt: skip
    """The loop's state at its first round: fresh, or after the round ``resume`` names (its convergence
    state replayed from the history; the time budget counts the time already spent in rounds)."""
    sites = SiteNames(watch.registered() if watch is not None else None)
    state = RoundState(settings, history, ConvergenceTracker(settings), sites, DarkSites(history, sites, watch),
                       initial, start)  # fmt: skip
    if resume is None:
        return state
    state.start -= resume.elapsed_s
    state.server_round = resume.round
    if resume.state_dict is not None:
        state.arrays = ArrayRecord(resume.state_dict)
    for row in resume.trained:
        if row.eval_loss is not None:
            evaluated = {k.removeprefix("eval-"): v for k, v in row.metrics.items() if k.startswith("eval-")}
            state.replayed = state.tracker.observe(row.round, row.eval_loss, row.eval_accuracy, evaluated)
            if row.round == resume.best_round and resume.best_state_dict is not None:
                state.best = BestModel(row.round, row.eval_loss, row.eval_accuracy, ArrayRecord(resume.best_state_dict))
    return state


def already_stopped(state: RoundState, resume: ResumePoint | None, now: float) -> str | None:
    """Why a resumed run trains no round more: it had met its criteria and its coordinator died before the
    final evaluation (None: it goes on). Judged by the settings it resumes with: a higher max_rounds trains on."""
    if resume is None or not resume.trained:
        return None
    return state.replayed or state.tracker.limit(state.server_round, now - state.start, state.settings)


def collect_round(
    grid: Grid, strategy: Strategy, expected: Spec, state: RoundState, *, clock: Clock, watch: Watch | None
) -> tuple[Replies, Aggregate | None]:
    """One round's exchange: the replies (or why there were none: sites not connected) and, under
    secure aggregation, the aggregate already made. ``expected``: the model's names, shapes and dtypes."""
    settings, sites, server_round = state.settings, state.sites, state.server_round
    if not sites.by_node:  # the first round waits for min-nodes; later, a site that left is waited for
        wait_for_nodes(grid, settings, clock)  # by the absence steps, within the tolerance
    snapshot = NodeSnapshot(grid)  # the one read of the node list for this round (a node may leave after it)
    present = set(snapshot.nodes) - set(state.retired)
    if len(present) < settings.min_nodes:
        gone = sites.absent_from(present | set(state.retired)) or [
            f"{settings.min_nodes - len(present)} site(s) not seen yet"
        ]
        return Replies([], [f"{name}: not connected" for name in gone], gone), None
    # A site out of privacy budget gets no more train tasks (it would only refuse them again).
    messages = [m for m in strategy.configure_train(server_round, state.arrays, ConfigRecord(), snapshot.grid())
                if m.metadata.dst_node_id not in state.retired]  # fmt: skip
    secured: Aggregate | None = None
    if settings.secure_aggregation == "ckks":
        got, secured = ckks_exchange(grid, messages, state, clock=clock, watch=watch)
    elif settings.secure_aggregation != "off":
        got, secured = secure_exchange(grid, messages, state.arrays, server_round=server_round, settings=settings,
                                       sites=sites, clock=clock)  # fmt: skip
    else:
        got = round_replies(grid, messages, state, clock=clock, watch=watch, expected=expected)
        got = screen(got, expected, state.arrays, settings.max_update_norm)
    state.retired |= got.retired
    state.spent |= got.privacy
    return got, secured


def round_replies(
    grid: Grid, messages: list[Message], state: RoundState, *, clock: Clock, watch: Watch | None,
    expected: Spec | None = None,
) -> Replies:  # fmt: skip
    """A round's exchange of ``messages``, sorted out: a revoked site dropped at once, a dark one named.
    Under compression the model goes out in the run's form and each reply's change comes back as a model;
    a strategy of weighted means folds each update into a running sum as it arrives (:mod:`.fold`; ``expected``:
    the names, shapes and dtypes of the model as built, which each update is screened against)."""
    settings = state.settings
    dropped: dict[int, str] = {}
    traffic: dict[str, int] = {}
    broadcast = None
    if settings.compression != "none":
        from flowerbed.serverapp.compression import Broadcast

        if state.broadcast is None:
            state.broadcast = Broadcast(settings.compression, fp32=settings.broadcast_fp32)
        broadcast = state.broadcast
        broadcast.prepare(messages, state.arrays)
    running: Fold | None = None
    if expected is not None and folds(settings):
        running = Fold(expected, state.arrays, settings.max_update_norm)

    def take(reply: Message) -> Message:
        if broadcast is not None:
            broadcast.decode_one(reply)
        return running.take(reply) if running is not None else reply

    replies = exchange(grid, messages, settings.round_timeout_s, clock, watch=watch, dropped=dropped,
                       on_dark=state.dark.noted(state.server_round), traffic=traffic, on_reply=take)  # fmt: skip
    got = split_replies(messages, replies, state.sites, dropped)
    got.traffic, got.fold = traffic, running
    return got


def ckks_exchange(
    grid: Grid, messages: list[Message], state: RoundState, *, clock: Clock, watch: Watch | None
) -> tuple[Replies, Aggregate]:
    """One round under CKKS (:mod:`flowerbed.serverapp.ckks`): the key given to sites that lack it, the
    round's exchange with the sites that hold it, and their encrypted models added."""
    from flowerbed.serverapp import ckks

    if state.ckks is None:
        state.ckks = ckks.load(state.history.out_dir)
    revoked = set(watch.revoked()) if watch is not None else set()
    ready, keyed = ckks.prepare_round(grid, state, [m.metadata.dst_node_id for m in messages], revoked, clock)
    sent = [m for m in messages if m.metadata.dst_node_id in ready]
    state.ckks.attach(sent, state.sites.by_node)
    got = round_replies(grid, sent, state, clock=clock, watch=watch)
    got.errors = keyed.errors + got.errors
    got.absent += [a for a in keyed.absent if a not in got.absent]
    arrays, metrics = ckks.add(state, got)
    return got, (arrays, metrics)


def privacy_stop(state: RoundState, got: Replies, t0: float, clock: Clock) -> bool:
    """True (and a ``stopped`` row) when too few sites with privacy budget are left to train."""
    settings, sites, retired = state.settings, state.sites, state.retired
    can_go_on = len(set(sites.by_node) - set(retired))  # the sites seen that may still train
    if not retired or got.data_errors:
        return False
    if not ((got.retired and len(got.valid) < settings.min_nodes) or can_go_on < settings.min_nodes):
        return False
    names = ", ".join(sorted(sites.by_node.get(n, f"node {n}") for n in retired))
    why = f"privacy budget spent at {names}: {can_go_on} site(s) can go on, min-nodes is {settings.min_nodes}"
    state.history.append(
        RoundRow(state.server_round, len(got.valid), len(got.errors), None, None, None, round(clock() - t0, 2),
                 f"{PRIVACY_SPENT}: {why}", got.errors, kind=STOPPED, sites=got.sites, privacy=dict(state.spent))
    )  # fmt: skip
    audit_round(state.history, state.history.rows[-1], got.heads)
    return True


def short_round(state: RoundState, got: Replies, t0: float, clock: Clock, sleep: Callable[[float], None]) -> None:
    """A round short of min-nodes valid replies: wait for absent sites (a ``waiting`` row, at most one a
    minute) within the absence tolerance and return to retry it, else fail the run (RunFailedError)."""
    settings, history = state.settings, state.history
    state.absence.update(got.absent, clock(), state.dark.silent_for())
    why = f"round {state.server_round}: {len(got.valid)} valid replies, min-nodes is {settings.min_nodes}" + (
        f" ({'; '.join(got.errors)})" if got.errors else " (no reply before round-timeout-s)"
    )
    data_errors = got.data_errors
    if got.absent and not data_errors and state.absence.longest(clock()) < settings.site_absence_tolerance_s:
        if clock() - state.last_waiting_row >= WAITING_ROW_EVERY_S:  # the table shows it, not every retry
            state.last_waiting_row = clock()
            waiting = (
                f"waiting: {state.absence.describe(clock())} (tolerance {settings.site_absence_tolerance_s:.0f} s)"
            )
            history.append(
                RoundRow(state.server_round, len(got.valid), len(got.errors), None, None, None,
                         round(clock() - t0, 2), waiting, got.errors, kind=WAITING, sites=got.sites)
            )  # fmt: skip
        sleep(min(settings.absence_retry_s, settings.site_absence_tolerance_s))
        return
    if got.absent and not data_errors:
        why = f"{why}; absent too long: {state.absence.describe(clock())}"
    history.append(
        RoundRow(state.server_round, len(got.valid), len(got.errors), None, None, None,
                 round(clock() - t0, 2), f"failed: {why}", got.errors, kind=FAILED)
    )  # fmt: skip
    audit_round(history, history.rows[-1], got.heads)
    raise RunFailedError(why)


def finish_round(
    strategy: Strategy, state: RoundState, got: Replies, secured: Aggregate | None, *, t0: float, clock: Clock
) -> str | None:
    """Aggregate a round with enough replies, check the model is finite, observe convergence, keep the
    checkpoint, then write its row; returns the stop reason (None: go on)."""
    settings, history, server_round = state.settings, state.history, state.server_round
    state.absence.update(got.absent, clock())
    if secured is not None:
        new_arrays, metrics = secured
    elif got.fold is not None and got.valid:  # the strategy's aggregate of the mean: its aggregate of them all
        new_arrays, metrics = got.fold.aggregate(strategy, server_round, got.valid)
    else:
        new_arrays, metrics = strategy.aggregate_train(server_round, got.valid)
    broken = non_finite_values(new_arrays) if new_arrays is not None else 0
    if broken:  # e.g. a sum that overflowed, or masked updates that held NaN: never a global model
        why = (f"{NON_FINITE}: round {server_round}'s aggregated model has {broken:,} NaN or infinite values; "
               "lower the learning rate or set max_update_norm, then `flowerbed run --resume` from the last "
               "finite checkpoint")  # fmt: skip
        history.append(
            RoundRow(server_round, len(got.valid), len(got.errors), None, None, None, round(clock() - t0, 2),
                     f"failed: {why}", got.errors, kind=FAILED, sites=got.sites)
        )  # fmt: skip
        audit_round(history, history.rows[-1], got.heads, got.masked)
        raise RunFailedError(why)
    reason: str | None = None
    pooled = pooled_metrics(state.pool, sums_of(got.valid))  # they replace the weighted means of the same names
    every = all_metrics(metrics) | pooled
    eval_loss = every.get("eval-loss")
    eval_acc = every.get("eval-accuracy")
    if eval_loss is not None:
        evaluated = {k.removeprefix("eval-"): v for k, v in every.items() if k.startswith("eval-")}
        reason = state.tracker.observe(server_round, eval_loss, eval_acc, evaluated)
        if server_round > 1 and state.best.offer(server_round, eval_loss, eval_acc, state.arrays, settings.min_delta):
            history.save_best(server_round, state.arrays.to_torch_state_dict())
    if new_arrays is not None:
        state.arrays = new_arrays
    if reason is None:
        reason = state.tracker.limit(server_round, clock() - state.start, settings)
    if reason is None and stop_requested(history.out_dir) is not None:
        reason = STOP_ASKED
    # The checkpoint before its row: a row in the history always has its model to resume from.
    history.checkpoint(server_round, state.arrays.to_torch_state_dict(), keep=settings.keep_checkpoints)
    history.append(
        RoundRow(
            round=server_round,
            nodes=len(got.valid),
            failures=len(got.errors),
            train_loss=_metric(metrics, "train-loss"),
            eval_loss=eval_loss,
            eval_accuracy=eval_acc,
            seconds=round(clock() - t0, 2),
            stop_reason=reason or "",
            errors=got.errors,
            sites=got.sites,
            missing=sorted(set(state.sites.by_node.values()) - set(got.sites)),
            metrics=every,
            privacy=dict(state.spent),
            pooled=sorted(pooled),
            examples=dict(got.examples),
            code=dict(got.code),
            classes=dict(got.classes),
            approved=dict(got.approved),
            traffic=dict(got.traffic),
        )
    )
    audit_round(history, history.rows[-1], got.heads, got.masked)
    return reason


def final_evaluation(grid: Grid, strategy: Strategy, state: RoundState, clock: Clock) -> None:
    """The last model's own evaluation (a ``final-eval`` row after the rounds, never a round of its own),
    with the sites' local baselines when asked; it may become the best model."""
    settings, history, server_round, arrays = state.settings, state.history, state.server_round, state.arrays
    t0 = clock()
    baseline = server_round * settings.local_epochs if settings.local_baseline else 0
    final_eval, valid_n, errors = evaluate_final(grid, strategy, arrays, settings, server_round + 1, sites=state.sites,
                                                 baseline_epochs=baseline, pool=state.pool,
                                                 attach=keys_for(state))  # fmt: skip
    history.append(
        RoundRow(
            round=server_round + 1, nodes=valid_n, failures=len(errors), train_loss=None,
            eval_loss=final_eval.loss if final_eval else None,
            eval_accuracy=final_eval.accuracy if final_eval else None,
            seconds=round(clock() - t0, 2),
            stop_reason="evaluation of the last model" if final_eval else "final evaluation: too few replies",
            errors=errors, kind=FINAL_EVAL, metrics=final_eval.metrics if final_eval else {},
            per_site=final_eval.per_site if final_eval else {}, pooled=final_eval.pooled if final_eval else [],
        )
    )  # fmt: skip
    audit_round(history, history.rows[-1], {})
    if final_eval is not None:
        evaluated = {k.removeprefix("eval-"): v for k, v in final_eval.metrics.items() if k.startswith("eval-")}
        state.tracker.observe(server_round + 1, final_eval.loss, final_eval.accuracy, evaluated)
        if state.best.offer(server_round + 1, final_eval.loss, final_eval.accuracy, arrays, settings.min_delta):
            history.save_best(server_round + 1, arrays.to_torch_state_dict())


def keys_for(state: RoundState) -> Callable[[list[Message]], None] | None:
    """Under CKKS: what names the run's key in an evaluate message (and wraps it for a site without it)."""
    keyring = state.ckks
    if keyring is None:
        return None
    return lambda messages: keyring.attach(messages, state.sites.by_node)


def held_out_test(grid: Grid, strategy: Strategy, arrays: ArrayRecord, state: RoundState, clock: Clock) -> None:
    """The final model on each site's held-out test data, once: a ``held-out`` row with each site's figures
    and 95% intervals (``per_site``) and the pooled ones (``metrics``). A failure here costs only the row."""
    t0 = clock()
    try:
        snapshot = NodeSnapshot(grid)
        config = ConfigRecord({HELD_OUT_KEY: 1})
        messages = list(strategy.configure_evaluate(state.server_round + 1, arrays, config, snapshot.grid()))
        if (attach := keys_for(state)) is not None:
            attach(messages)
        got = split_replies(messages, exchange(grid, messages, state.settings.round_timeout_s), state.sites)
        per_site = {name: all_metrics(reply.content.metric_records.get("metrics"))
                    for name, reply in zip(got.sites_unsorted, got.valid, strict=True)}  # fmt: skip
        together, errors = pooled(per_site), got.errors
    except Exception as exc:  # noqa: BLE001 - the run has ended well; its test figures are an extra
        per_site, together, errors = {}, {}, [f"held-out test failed: {type(exc).__name__}: {exc}"]
    said = "held-out test of the final model" if together else "held-out test: no site has test data"
    state.history.append(RoundRow(state.server_round + 1, len(per_site), len(errors), None, None, None,
                                  round(clock() - t0, 2), said, errors, kind=HELD_OUT, metrics=together,
                                  per_site=per_site))  # fmt: skip


def run_rounds(
    grid: Grid,
    strategy: Strategy,
    initial: ArrayRecord,
    settings: RunSettings,
    history: History,
    *,
    clock: Clock = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
    resume: ResumePoint | None = None,
    watch: Watch | None = None,
    pool: Pool | None = None,
    standardize: Callable[[Grid, RoundState, Clock, Callable[[float], None]], None] | None = None,
) -> Outcome:
    """Train until target/plateau/max-rounds/time-budget, or the coordinator's stop (`flowerbed runs stop`).

    A round short of min-nodes valid replies because sites are absent waits and is retried with the
    nodes present, for at most ``site_absence_tolerance_s`` per absence; a site whose ClientApp
    failed on its data is not absent, and the run fails at once. Raises :class:`RunFailedError`.

    ``resume``: go on after the round it names, with the convergence state its history implies
    (the time budget counts the time already spent in rounds, not the time the coordinator was down).
    ``watch``: revocations and last contacts of the sites, asked while a round waits: a revoked site
    is dropped at once, a dark one named in an ``away`` row within half a minute. ``pool``: the task's
    pooled metrics from the sites' statistics (:func:`flowerbed.task.pool_metrics`). ``standardize``:
    fills the model's feature scaling from the sites' sums before round 1 (:mod:`flowerbed.serverapp.scaling`;
    a resumed run's checkpoint holds it already).
    """
    expected = spec_of(initial)
    state = start_rounds(initial, settings, history, clock(), resume=resume, watch=watch)
    del initial  # the model as built is held as the first global model only, not beside every later one
    state.pool = pool
    if standardize is not None and (resume is None or resume.state_dict is None):
        standardize(grid, state, clock, sleep)
    reason = already_stopped(state, resume, clock())
    while reason is None:
        state.server_round += 1
        t0 = clock()
        got, secured = collect_round(grid, strategy, expected, state, clock=clock, watch=watch)
        if state.carried:  # a site revoked while the feature statistics were asked is named in round 1's row
            got.errors = [*state.carried, *(e for e in got.errors if e not in state.carried)]
            state.carried = []
        if privacy_stop(state, got, t0, clock):
            reason = PRIVACY_SPENT
            state.server_round -= 1  # nothing was trained in it
            break
        if len(got.valid) < settings.min_nodes:
            short_round(state, got, t0, clock, sleep)  # waits (or raises RunFailedError)
            state.server_round -= 1  # the same round again, with the nodes present
            if stop_requested(history.out_dir) is not None:
                reason = STOP_ASKED
                break
            continue
        reason = finish_round(strategy, state, got, secured, t0=t0, clock=clock)
    if (
        reason in (MAX_ROUNDS, TIME_BUDGET, PRIVACY_SPENT, STOP_ASKED)
        or state.best.arrays is None
        or settings.local_baseline
    ):
        final_evaluation(grid, strategy, state, clock)
    # No trained model was evaluated: the last one, never the initial one.
    best = state.best
    final = best.arrays if best.arrays is not None else state.arrays
    if settings.held_out():
        held_out_test(grid, strategy, final, state, clock)
    return Outcome(reason, state.server_round, best.round, best.loss, best.accuracy, final, state.spent)


def evaluate_final(
    grid: Grid,
    strategy: Strategy,
    arrays: ArrayRecord,
    settings: RunSettings,
    server_round: int,
    *,
    sites: SiteNames,
    baseline_epochs: int = 0,
    pool: Pool | None = None,
    attach: Callable[[list[Message]], None] | None = None,
) -> tuple[FinalEval | None, int, list[str]]:
    """One evaluate exchange for the last aggregated model (it was never evaluated).

    ``baseline_epochs`` > 0: each site first trains a local-only model that long (as many epochs as
    its federated training took) and reports its metrics too (``local-*``); the model stays there.
    Returns its metrics or None, the number of valid replies, and the errors naming sites.
    """
    config = ConfigRecord({BASELINE_KEY: baseline_epochs} if baseline_epochs > 0 else {})
    snapshot = NodeSnapshot(grid)
    if len(snapshot.nodes) < settings.min_nodes:
        return None, 0, [f"only {len(snapshot.nodes)} of min-nodes={settings.min_nodes} sites connected"]
    messages = list(strategy.configure_evaluate(server_round, arrays, config, snapshot.grid()))
    if attach is not None:  # CKKS: the model's key named, wrapped for a site that lacks it
        attach(messages)
    replies = exchange(grid, messages, settings.round_timeout_s + (settings.round_timeout_s if baseline_epochs else 0))
    got = split_replies(messages, replies, sites)
    per_site = {name: all_metrics(reply.content.metric_records.get("metrics")) | {"examples": got.examples.get(name, 0)}
                for name, reply in zip(got.sites_unsorted, got.valid, strict=True)}  # fmt: skip
    if len(got.valid) < settings.min_nodes:
        return None, len(got.valid), got.errors
    pooled = pooled_metrics(pool, sums_of(got.valid))
    every = all_metrics(strategy.aggregate_evaluate(server_round, got.valid)) | pooled
    loss = every.get("eval-loss")
    if loss is None:
        return None, len(got.valid), got.errors
    final = FinalEval(loss, every.get("eval-accuracy"), every, per_site, sorted(pooled))
    return final, len(got.valid), got.errors
