"""The gold standard: the same federation retrained without the forgotten data."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from logging import INFO, WARNING
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy
from torch import Tensor

from fl_unlearn.requests import UnlearningRequest
from strategies import records as R
from strategies.base import DelegatingStrategy
from strategies.strategy_utils import with_config


class RetrainStrategy(DelegatingStrategy):
    """The same federation without the forgotten data: the retrain baseline (gold standard).

    Clients drop the request's classes or samples before training (keys in the train config); a client
    request leaves the forgotten clients out of sampling. Use a fresh inner strategy, the same initial
    weights and the same ``seed`` as the original run. Nothing is recorded.

    Parameters
    ----------
    on_model : Callable[[str, dict[str, Tensor]], None] | None (default: None)
        Called with each retrained model as it is made, under the lineage id of the model it is the twin of
        (``local-r<round>-p<partition>`` for a client's update, ``global-r<round>`` for the aggregate): the
        comparison of every affected model with its retrained twin. Its time is kept apart in ``on_model_s``.
    """

    def __init__(self, strategy: Strategy, request: UnlearningRequest, *, num_nodes: int = 0, seed: int = 0,
                 node_timeout: float = 120.0, on_model: Callable[[str, dict[str, Tensor]], None] | None = None
                 ) -> None:
        super().__init__(strategy, num_nodes=num_nodes, seed=seed, node_timeout=node_timeout)
        self.request = request
        self.on_model = on_model
        self.on_model_s = 0.0

    def summary(self) -> None:
        """Log summary configuration of the strategy."""
        log(INFO, "\t├──> Retrain baseline without: %s", self.request.describe())
        super().summary()

    def _excluded_partitions(self) -> set[int]:
        return set(self.request.clients) if self.request.kind == "client" else set()

    def _extra_train_config(self, server_round: int) -> dict[str, Any]:
        # No Fisher: the retrained models are compared, never unlearned (a client asked for none would otherwise
        # accumulate one, or with a non-batch estimator make a whole Fisher pass every round, inside retrain_s)
        extra: dict[str, Any] = {R.ACCUMULATE: False}
        if self.request.kind == "classes":
            extra[R.EXCLUDE_CLASSES] = list(self.request.classes)
        return extra

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Configure as the inner strategy does, telling each client what to leave out."""
        messages = list(super().configure_train(server_round, arrays, config, grid))
        if self.request.kind == "samples":
            for m in messages:
                pid = self.nodes.partition[m.metadata.dst_node_id]
                with_config(m, {R.EXCLUDE_SAMPLES: list(self.request.samples.get(pid, ()))})
        if self.request.kind == "client" and len(messages) == 0:
            log(WARNING, "retrain: no node left to train after excluding clients %s", list(self.request.clients))
        return messages

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Aggregate as the inner strategy does; hand each client's update and the aggregate to ``on_model``."""
        replies = self._in_partition_order(replies)
        arrays, metrics = super().aggregate_train(server_round, replies)
        if self.on_model is not None:
            start = time.perf_counter()
            for reply in replies:
                if not reply.has_error() and len(reply.content.array_records) == 1:
                    pid = self.nodes.partition.get(reply.metadata.src_node_id)
                    (record,) = reply.content.array_records.values()
                    self.on_model(f"local-r{server_round}-p{pid}", R.record_to_tensors(record))
            if arrays is not None:
                self.on_model(f"global-r{server_round}", R.record_to_tensors(arrays))
            self.on_model_s += time.perf_counter() - start
        return arrays, metrics
