"""The delegating base of fl_unlearn's strategy wrappers (shaped like Flower's DP wrappers)."""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from fl_unlearn.errors import ConfigError, UnlearnError
from strategies import records as R
from strategies.nodes import GridView, NodeDirectory
from strategies.strategy_utils import seeded_random, with_config


class DelegatingStrategy(Strategy):
    """Base of fl_unlearn's wrappers: delegates the five methods to the wrapped ``self.strategy``.

    Around the delegation it learns node -> partition (``query.info``), lets the inner strategy sample from
    nodes sorted by partition id with a private seeded generator, adds our keys to each train message
    (subclasses say which), strips our records from train replies and hands replies to the inner strategy in
    partition order (so aggregation sums in a fixed order and runs repeat bit for bit).

    Parameters
    ----------
    strategy : Strategy
        Any ``flwr.serverapp.strategy`` strategy.
    num_nodes : int (default: 0)
        Nodes to wait for before the first round (the registration race).
    seed : int (default: 0)
        Seeds node sampling.
    node_timeout : float (default: 120.0)
        Seconds to wait for nodes and replies.
    """

    def __init__(self, strategy: Strategy, *, num_nodes: int = 0, seed: int = 0, node_timeout: float = 120.0) -> None:
        if not isinstance(strategy, Strategy):
            raise ConfigError(
                f"expected a flwr.serverapp.strategy.Strategy, got {type(strategy).__name__}; legacy "
                "flwr.server.strategy strategies cannot drive Message-API clients"
            )
        self.strategy = strategy
        self.nodes = NodeDirectory(num_nodes, timeout=node_timeout)
        self.seed = seed
        self._rng = random.Random(seed)

    def summary(self) -> None:
        """Log summary configuration of the strategy."""
        self.strategy.summary()

    def _excluded_partitions(self) -> set[int]:
        return set()

    def _extra_train_config(self, server_round: int) -> dict[str, Any]:
        return {}

    def _sampled(self, grid: Grid, configure: Callable[[GridView], Iterable[Message]]) -> list[Message]:
        """Run an inner ``configure_*`` on nodes sorted by partition id, with our seeded generator."""
        self.nodes.refresh(grid)
        nodes = self.nodes.sorted_nodes(self._excluded_partitions())
        if not nodes:  # the inner strategy would wait for nodes in its sampling loop forever
            raise UnlearnError("no connected node to sample: none answered query.info (pass num_nodes, the "
                               "federation size, so the strategy waits for them)")
        view = GridView(grid, nodes)
        with seeded_random(self._rng):
            return list(configure(view))

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Sample (seeded, by partition id) through the inner strategy; add our keys to each message."""
        messages = self._sampled(grid, lambda view: self.strategy.configure_train(server_round, arrays, config, view))
        extra = self._extra_train_config(server_round)
        return [with_config(m, extra) for m in messages]

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Configure the next round of federated evaluation (seeded sampling)."""
        return self._sampled(grid, lambda view: self.strategy.configure_evaluate(server_round, arrays, config, view))

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """Aggregate evaluation metrics (unchanged)."""
        return self.strategy.aggregate_evaluate(server_round, replies)

    @staticmethod
    def _strip(reply: Message) -> tuple[ArrayRecord | None, ConfigRecord | None]:
        """Remove our Fisher and lineage records from a train reply; return them."""
        if reply.has_error():
            return None, None
        content = reply.content
        fisher = content.array_records.get(R.FISHER_KEY)
        lineage = content.config_records.get(R.LINEAGE_KEY)
        reply.content = RecordDict({k: v for k, v in content.items() if k not in (R.FISHER_KEY, R.LINEAGE_KEY)})
        return fisher, lineage

    def _in_partition_order(self, replies: Iterable[Message]) -> list[Message]:
        """Replies sorted by partition id: aggregation sums in a fixed order, so runs repeat bit for bit."""
        return sorted(replies, key=lambda r: self.nodes.partition.get(r.metadata.src_node_id, -1))

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Strip our records, then aggregate with the inner strategy (replies in partition order)."""
        replies = self._in_partition_order(replies)
        for reply in replies:
            self._strip(reply)
        return self.strategy.aggregate_train(server_round, replies)
