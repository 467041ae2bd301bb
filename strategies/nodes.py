"""Nodes of a run: waiting out the registration race, node id -> partition id, checked and retried replies.

Node ids are random per run (``reference/flower.md`` §3), so the wrapper learns which node holds which
partition with ``query.info``, and orders nodes by partition id wherever order matters (sampling,
aggregation), so runs repeat.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from logging import INFO, WARNING
from typing import Any

from flwr.app import ConfigRecord, Message, RecordDict
from flwr.common.constant import ErrorCode
from flwr.common.logger import log
from flwr.serverapp import Grid

from fl_unlearn.errors import UnlearnError
from strategies import records as R


def wait_for_nodes(grid: Grid, num_nodes: int, timeout: float = 120.0, *, exclude: Iterable[int] = ()) -> list[int]:
    """Block until ``num_nodes`` nodes are connected (not counting those in ``exclude``); return their ids.

    ``get_node_ids()`` can return 0 nodes right after start (flower.md §3, registration race).

    Raises
    ------
    UnlearnError
        Fewer nodes after ``timeout`` seconds.
    """
    skip = set(exclude)
    deadline = time.monotonic() + timeout
    while len(ids := [n for n in grid.get_node_ids() if n not in skip]) < num_nodes:
        if time.monotonic() > deadline:
            left_out = f" ({len(skip)} more listed but unavailable)" if skip else ""
            raise UnlearnError(
                f"only {len(ids)} of {num_nodes} nodes connected after {timeout:.0f} s{left_out}; pass num-clients "
                "equal to num-supernodes"
            )
        time.sleep(0.1)
    return ids


#: Shortest and longest wait between two pulls of :func:`exchange` (seconds), and the wait as a share of the time
#: the round trip has taken so far: a reply waits at most ~5 % of the round trip for its pull.
POLL_FIRST, POLL_MAX, POLL_SHARE = 0.005, 0.1, 0.05


class Exchange:
    """One round trip, begun: the messages are pushed when it is made, and :meth:`replies` waits for the answers.

    In between, the server can do its own work while the clients do theirs: a simulation engine picks pushed
    messages up only every 0.1 s, and the clients then take a while, so journaling and loading done after the push
    cost no time of the request's (:func:`exchange` is ``Exchange(...).replies()``). A grid that only offers
    ``send_and_receive`` (a test double) gets the messages when :meth:`replies` is called.

    Parameters
    ----------
    grid : Grid
    messages : Iterable[Message]
    timeout : float | None (default: None)
        Seconds, from the push, to wait for the replies; ``None`` waits for all of them, as in Flower.
    """

    def __init__(self, grid: Grid, messages: Iterable[Message], *, timeout: float | None = None) -> None:
        self._grid, self._timeout = grid, timeout
        self._push, self._pull = getattr(grid, "push_messages", None), getattr(grid, "pull_messages", None)
        self._start = time.monotonic()
        if callable(self._push) and callable(self._pull):
            self._messages: list[Message] = []
            self._pending: set[str] = set(self._push(messages))
        else:
            self._messages, self._pending = list(messages), set()
        self._done = False

    def replies(self) -> list[Message]:
        """The replies that arrive before the timeout, in arrival order (once: a second call is an error).

        Pulls after 5 ms, then waits 5 % of the time elapsed since the push (at most 0.1 s) between pulls.
        Flower's own loop sleeps a fixed interval (0.1 s in simulation, 3 s on a SuperLink's ``GrpcGrid``), so a
        round trip whose clients answer in a fraction of a second would still cost that interval: a 0.4 s round
        trip loses ~10 ms to the pull interval, not ~50 ms.
        """
        if self._done:
            raise UnlearnError("Exchange.replies: the replies of this round trip were already collected")
        self._done = True
        if not (callable(self._push) and callable(self._pull)):
            return list(self._grid.send_and_receive(self._messages, timeout=self._timeout))
        pending = self._pending
        deadline = None if self._timeout is None else self._start + self._timeout
        replies: list[Message] = []
        while pending:
            arrived = list(self._pull(pending))
            replies.extend(arrived)
            pending.difference_update(m.metadata.reply_to_message_id for m in arrived)
            if not pending or (deadline is not None and time.monotonic() >= deadline):
                break
            now = time.monotonic()
            wait = min(max(POLL_SHARE * (now - self._start), POLL_FIRST), POLL_MAX)
            time.sleep(wait if deadline is None else max(0.0, min(wait, deadline - now)))
        return replies


def exchange(grid: Grid, messages: Iterable[Message], *, timeout: float | None = None) -> list[Message]:
    """``grid.send_and_receive`` with a short, growing pull interval (:meth:`Exchange.replies`).

    Parameters
    ----------
    grid : Grid
    messages : Iterable[Message]
    timeout : float | None (default: None)
        Seconds to wait for the replies; ``None`` waits for all of them, as in Flower.

    Returns
    -------
    list[Message]
        The replies that arrived, in arrival order.
    """
    return Exchange(grid, messages, timeout=timeout).replies()


def error_reason(reply: Message) -> str:
    """A one-line description of an error reply."""
    return f"node {reply.metadata.src_node_id}: {reply.error.reason}"


class NodeDirectory:
    """Which node holds which partition, learned with ``query.info`` (node ids are random per run).

    Attributes
    ----------
    partition : dict[int, int]
        Node id -> partition id.
    info : dict[int, dict]
        Partition id -> ``{"num-examples": int, "histogram": {class: count}}``.
    unavailable : set[int]
        Node ids the SuperLink still lists but that did not heartbeat (``NODE_UNAVAILABLE`` replies): a SuperNode
        that went away, or one a restarted SuperLink remembers from its database. Left out of the federation.
    """

    def __init__(self, num_nodes: int = 0, *, timeout: float = 120.0) -> None:
        self.num_nodes, self.timeout = num_nodes, timeout
        self.partition: dict[int, int] = {}
        self.info: dict[int, dict[str, Any]] = {}
        self.unavailable: set[int] = set()

    def refresh(self, grid: Grid) -> None:
        """Wait for the expected nodes, then ask every node not seen yet for its partition (one round trip).

        A node the SuperLink reports unavailable is left out (logged), and the directory waits for the expected
        number of nodes without it, within the same ``timeout``.
        """
        deadline = time.monotonic() + self.timeout
        while True:
            ids = wait_for_nodes(grid, self.num_nodes, max(0.0, deadline - time.monotonic()),
                                 exclude=self.unavailable)
            live = set(ids)
            self.partition = {n: p for n, p in self.partition.items() if n in live}
            new = [n for n in ids if n not in self.partition]
            if not new:
                return
            self._ask_new(grid, new)
            if len(self.partition) >= self.num_nodes:
                break
        log(INFO, "query.info: %d nodes, partitions %s", len(self.partition), sorted(self.partition.values()))

    #: Round trips a silent node gets before ``refresh`` gives up on it.
    INFO_ATTEMPTS = 3

    def _ask_new(self, grid: Grid, new: list[int]) -> None:
        # A node that has not answered yet (a client still starting on a loaded machine) is asked again: an
        # inner strategy shown fewer nodes than it needs would wait in its sampling loop forever.
        for _ in range(self.INFO_ATTEMPTS):
            self._ask_info(grid, new)
            new = [n for n in new if n not in self.partition and n not in self.unavailable]
            if not new:
                return
        raise UnlearnError(f"query.info: nodes {new} did not answer in {self.INFO_ATTEMPTS} attempts of "
                           f"{self.timeout:.0f} s; the federation cannot be sampled without them")

    def _ask_info(self, grid: Grid, nodes: list[int]) -> None:
        msgs = [Message(RecordDict({R.CONFIG_KEY: ConfigRecord()}), dst_node_id=n, message_type=R.MSG_INFO)
                for n in nodes]
        replies = exchange(grid, msgs, timeout=self.timeout)
        # The SuperLink answers for an unavailable node (the reply's source is the SuperLink): the node is the
        # destination of the message replied to (push gave every message its id).
        destination = {m.metadata.message_id: m.metadata.dst_node_id for m in msgs if m.metadata.message_id}
        for reply in replies:
            if reply.has_error() and reply.error.code == ErrorCode.NODE_UNAVAILABLE:
                node = destination.get(reply.metadata.reply_to_message_id, reply.metadata.src_node_id)
                log(WARNING, "query.info: node %s unavailable (%s); left out of this run", node, reply.error.reason)
                self.unavailable.add(node)
                continue
            if reply.has_error():
                raise UnlearnError(
                    f"query.info failed ({error_reason(reply)}); register the unlearning handlers on the ClientApp "
                    "(strategies.client.register_unlearning_handlers) or add strategies.client.unlearning_mod"
                )
            cfg = reply.content.config_records[R.INFO_KEY]
            pid = int(cfg[R.PARTITION_ID])
            self.partition[reply.metadata.src_node_id] = pid
            self.info[pid] = {"num-examples": int(cfg[R.NUM_EXAMPLES]), "histogram": R.histogram_from_config(cfg)}

    def node_of(self, pid: int) -> int:
        """The node id holding partition ``pid``."""
        for node, p in self.partition.items():
            if p == pid:
                return node
        raise UnlearnError(f"no connected node holds partition {pid}; known: {sorted(self.partition.values())}")

    def sorted_nodes(self, exclude: Iterable[int] = ()) -> list[int]:
        """Node ids ordered by partition id, without the partitions in ``exclude``."""
        skip = set(exclude)
        return [n for n, p in sorted(self.partition.items(), key=lambda kv: kv[1]) if p not in skip]


class GridView:
    """What the inner strategy sees: a Grid whose nodes are sorted by partition id (some maybe hidden)."""

    def __init__(self, grid: Grid, node_ids: list[int]) -> None:
        self._grid, self._node_ids = grid, node_ids

    def get_node_ids(self) -> list[int]:
        return list(self._node_ids)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._grid, name)


def checked_replies(replies: Iterable[Message], what: str) -> list[Message]:
    """All replies, or an ``UnlearnError`` listing every error reply."""
    replies = list(replies)
    errors = [error_reason(r) for r in replies if r.has_error()]
    if errors:
        raise UnlearnError(f"{what} failed on {len(errors)} node(s): " + "; ".join(errors))
    return replies


def send_with_retries(
    grid: Grid, messages: Iterable[Message], what: str, *, timeout: float | None, retries: int = 2,
    check: Callable[[Message], None] | None = None,
) -> tuple[list[Message], dict[int, str]]:
    """Send, then resend (at most ``retries`` times) to every node that answered with an error or not at all.

    Unlike :func:`checked_replies` this never raises for a failing node: the caller decides what a missing
    reply means (``train.unlearn``: the request stays incomplete for that client's models).

    Parameters
    ----------
    grid : Grid
    messages : Iterable[Message]
        At most one per destination node.
    what : str
        The message type, for logs and reasons.
    timeout : float | None
        Seconds to wait for the replies of each attempt.
    retries : int (default: 2)
        Extra attempts after the first.
    check : callable | None (default: None)
        Called on each reply; an exception raised there propagates (hostile content is an error, not a fault
        to retry).

    Returns
    -------
    tuple[list[Message], dict[int, str]]
        The good replies, and destination node id -> the last reason for every node that never answered well.
    """
    pending = {m.metadata.dst_node_id: m for m in messages}
    good: list[Message] = []
    reasons: dict[int, str] = {}
    for attempt in range(retries + 1):
        if not pending:
            break
        if attempt:
            log(WARNING, "%s: retry %d of %d for %d node(s): %s", what, attempt, retries, len(pending),
                "; ".join(reasons[n] for n in pending))
        batch = [Message(m.content, dst_node_id=n, message_type=m.metadata.message_type) for n, m in pending.items()]
        answered: set[int] = set()
        for reply in exchange(grid, batch, timeout=timeout):
            node = reply.metadata.src_node_id
            if node not in pending or node in answered:
                continue  # a stray or duplicate reply
            answered.add(node)
            if reply.has_error():
                reasons[node] = error_reason(reply)
                continue
            if check is not None:
                check(reply)
            good.append(reply)
            del pending[node]
        for node in set(pending) - answered:
            reasons[node] = f"node {node}: no reply within {timeout} s"
    return good, {n: reasons[n] for n in pending}
