"""``train.erase``: after a request is verified, delete what it replaced, at the server and at the clients.

Server side, :func:`erase_request` erases from the server's store the superseded weights and the request's
Fishers (:func:`fl_unlearn.erasure.erase_superseded`), then sends ``train.erase`` to every client that holds a
superseded model (derived models before unlearning, and before their repair). Client side, :func:`handle_erase`
deletes those models' weights from the client's own store, after checking that its index holds a version that
replaces each one; the index keeps the entries, marked ``erased``. Each erased object leaves a tombstone, so a
later read says what happened to it.

What a client cannot be made to do here: a client that does not answer keeps its copies. The report names it
(``failures``; every holder is named there until it confirms, so a server crash in between leaves them named too),
and :func:`retry_erasures`, which the App calls before each request, sends ``train.erase`` again.
"""

from __future__ import annotations

import time
from logging import INFO, WARNING
from typing import TYPE_CHECKING, Any

from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.common.logger import log

from fl_unlearn.erasure import erase_object, erase_superseded
from fl_unlearn.errors import UnlearnError
from fl_unlearn.journal import RequestJournal
from strategies import records as R

if TYPE_CHECKING:
    from flwr.serverapp import Grid

    from strategies.client import ClientSpec
    from strategies.server import UnlearningStrategy

#: The erasure report of each request, a store document: ``erasures/<request id>``.
ERASURE_DOC = "erasures"


def erasure_doc(request_id: str) -> str:
    """The store document of a request's erasure report (a document name may not start with '-')."""
    return f"{ERASURE_DOC}/{request_id.lstrip('-') or 'request'}"


def handle_erase(spec: ClientSpec, msg: Message, context: Context) -> Message:
    """``train.erase``: delete the weights of the listed models this client holds; each must be replaced by a
    version in this client's index (an unlearned or repaired one), else nothing is deleted."""
    from strategies.client import MODELS_DOC, client_store, held_index, partition_id

    config = R.first_config(msg)
    store = client_store(context, config)
    ids = [str(i) for i in config[R.MODEL_IDS]]
    reason = str(config.get(R.ERASE_REASON, "")) or "erased after an unlearning request (superseded)"
    index = held_index(store, ids)
    replaced = {str(entry["replaces"]) for entry in index.values() if entry.get("replaces")}
    unreplaced = [i for i in ids if i not in replaced]
    if unreplaced:
        raise UnlearnError(f"train.erase: no model this client holds replaces {unreplaced}; nothing erased")
    # a digest another kept entry still points at stays (an unlearned version equal to its original, say)
    erasing = set(ids)
    live = {entry["weights"] for i, entry in index.items()
            if i not in erasing and entry.get("weights") and not entry.get("erased")}
    erased, freed = 0, 0
    for node_id in ids:
        digest = index[node_id]["weights"]
        if digest not in live and (size := erase_object(store, digest, f"{node_id}: {reason}")):
            erased, freed = erased + 1, freed + size
        index[node_id] = {**index[node_id], "erased": reason}
    store.put_json(MODELS_DOC, index)
    log(INFO, "train.erase: partition %d erased %d superseded models (%d files, %.1f MiB)", partition_id(context),
        len(ids), erased, freed / 2**20)
    return Message(RecordDict({R.METRICS_KEY: MetricRecord({R.ERASED: erased, R.BYTES_FREED: freed})}),
                   reply_to=msg)


def retry_erasures(grid: Grid, strategy: UnlearningStrategy) -> dict[str, dict[str, Any]]:
    """Erase again every request whose erasure report names clients that did not confirm (down, or a crash
    before they answered): request id -> the new report's summary. The App calls it at the start of each run
    that unlearns, so a client that was down erases its copies at the next request."""
    out = {}
    for name in strategy.store.docs(f"{ERASURE_DOC}/"):
        report = strategy.store.get_json(name) or {}
        if report.get("failures") and report.get("request_id"):
            log(INFO, "erase: request %s left copies at clients %s; asking again", report["request_id"],
                sorted(report["failures"]))
            out[report["request_id"]] = erasure_summary(erase_request(grid, strategy, report["request_id"]))
    return out


def erasure_summary(report: dict[str, Any]) -> dict[str, Any]:
    """results.json's ``erasure``: counts of an erasure report (the store document lists every object)."""
    return {"server_models": len(report["models"]), "server_objects": len(report["objects"]),
            "bytes_freed": report["bytes_freed"] + sum(c["bytes_freed"] for c in report["clients"].values()),
            "client_models": sum(map(len, report["client_models"].values())),
            "client_files": sum(c["erased"] for c in report["clients"].values()),
            "kept": len(report["kept"]), "failures": report["failures"], "seconds": report["seconds"]}


def erase_request(grid: Grid, strategy: UnlearningStrategy, request_id: str) -> dict[str, Any]:
    """Erase what the verified request ``request_id`` replaced, in the server's store and at the clients.

    Returns the report also stored as the document ``erasures/<request id>``: the server's
    :class:`fl_unlearn.erasure.Erasure` as a dict, plus ``clients`` (partition -> files erased and bytes freed
    there), ``failures`` (partition -> why its copies stay) and ``seconds``.

    Raises
    ------
    UnlearnError
        The request is not ``verified`` in the store's journal; nothing is erased.
    """
    from strategies.nodes import send_with_retries

    start = time.perf_counter()
    store = strategy.store
    with store.lock():
        erasure = erase_superseded(RequestJournal.for_store(store), strategy.graph, store, request_id)
    reason = f"erased after unlearning request {request_id} (superseded)"
    clients: dict[str, dict[str, int]] = {}
    # until the clients confirm, they count as failed: a crash before their replies leaves the report saying so,
    # and the next run asks them again (retry_erasures)
    pending = {str(pid): "not confirmed yet" for pid in erasure.client_models}
    store.put_json(erasure_doc(request_id), {**erasure.to_dict(), "clients": {}, "failures": pending,
                                             "seconds": time.perf_counter() - start})
    failures: dict[str, str] = {}
    msgs = []
    if erasure.client_models:
        strategy.nodes.refresh(grid)
    for pid, ids in sorted(erasure.client_models.items()):
        if not any(p == pid for p in strategy.nodes.partition.values()):
            failures[str(pid)] = f"no connected node holds partition {pid}"
            continue
        cfg = ConfigRecord({R.MODEL_IDS: ids, R.STORE_DIR: str(store.root), R.ERASE_REASON: reason})
        msgs.append(Message(RecordDict({R.CONFIG_KEY: cfg}), dst_node_id=strategy.nodes.node_of(pid),
                            message_type=R.MSG_ERASE))
    if msgs:
        replies, failed = send_with_retries(grid, msgs, R.MSG_ERASE, timeout=strategy.nodes.timeout,
                                            retries=strategy.reply_retries)
        for reply in replies:
            metrics = reply.content.metric_records[R.METRICS_KEY]
            pid = strategy.nodes.partition.get(reply.metadata.src_node_id, -1)
            clients[str(pid)] = {"erased": int(metrics[R.ERASED]), "bytes_freed": int(metrics[R.BYTES_FREED])}
        failures.update({str(strategy.nodes.partition.get(n, n)): why for n, why in failed.items()})
    report = {**erasure.to_dict(), "clients": clients, "failures": failures,
              "seconds": time.perf_counter() - start}
    store.put_json(erasure_doc(request_id), report)
    if failures:
        log(WARNING, "erase: request %s: clients %s did not erase their superseded models (%s); erasing the "
            "request again asks them again", request_id, sorted(failures), failures)
    log(INFO, "erase: request %s: %d server objects and %d client-held models erased in %.2f s", request_id,
        len(erasure.objects), sum(c["erased"] for c in clients.values()), report["seconds"])
    return report
