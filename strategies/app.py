"""Factories for the App's ServerApp and ClientApp.

``simulations/cifar100_fedavg`` calls them without arguments; tests call them with run-config overrides,
because ``run_simulation`` gives an empty ``context.run_config`` (flower.md §7).

Examples
--------
::

    run_simulation(make_server_app({"dataset": "digits", "out-dir": str(tmp)}),
                   make_client_app({"dataset": "digits"}), num_supernodes=2)
"""

from __future__ import annotations

import gc
from collections.abc import Mapping
from typing import Any

import torch
from datasets import Dataset
from flwr.app import Context, Message
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from torch import nn

from fl_unlearn.data import FederatedData, load_with_fallback
from strategies.client import ClientSpec, Handler, partition_id, register_unlearning_handlers
from strategies.config import DEFAULTS, AppConfig
from strategies.experiment import _model_factory, run_experiment
from strategies.sisa_client import register_sisa_handlers, sisa_mod
from strategies.verify import poisoned_partition


def _config(context: Context) -> AppConfig:
    return AppConfig.from_run_config(context.run_config)


def _data(context: Context) -> FederatedData:
    cfg = _config(context)
    return load_with_fallback(cfg.data_config(), cfg.dataset_fallback or None)[0]  # cached per process


def app_model(context: Context) -> nn.Module:
    """The App's model for this run's data (``model=auto``: cnn for grey images, resnet18 for colour)."""
    return _model_factory(_config(context), _data(context))[1]()


def app_partition(context: Context) -> Dataset:
    """This client's partition of the App's data; a forgotten client's carries the backdoor when
    ``backdoor-fraction`` > 0 (``strategies.verify``)."""
    cfg, pid = _config(context), partition_id(context)
    ds = _data(context).partition(pid)
    if not cfg.poisons(pid):
        return ds
    key = (repr(cfg.data_config()), pid, cfg.backdoor_fraction, cfg.backdoor_target)
    return poisoned_partition(ds, cfg.backdoor_fraction, cfg.backdoor_target, seed=cfg.seed + pid, key=key)


def app_test(context: Context) -> Dataset:
    """The held-out test split (public data, the same for every client)."""
    return _data(context).test


def with_run_config(overrides: Mapping[str, Any] | None) -> Any:
    """A mod completing ``context.run_config`` with the App defaults and ``overrides`` (for run_simulation)."""
    extra = dict(overrides or {})

    def mod(msg: Message, context: Context, call_next: Handler) -> Message:
        original = context.run_config
        context.run_config = {**DEFAULTS, **original, **extra}
        torch.set_num_threads(1)
        try:
            return call_next(msg, context)
        finally:  # Flower refuses a run_config changed by the app
            context.run_config = original

    return mod


def make_client_app(overrides: Mapping[str, Any] | None = None) -> ClientApp:
    """The App's ClientApp: fl_unlearn's handlers (FIUn and SISA) over the App's data and model."""
    spec = ClientSpec(model_fn=app_model, data_fn=app_partition, test_fn=app_test)
    # sisa_mod: `train` rounds of a shard-model
    app = ClientApp(mods=[freeze_after_startup, with_run_config(overrides), sisa_mod(spec)])
    register_unlearning_handlers(app, spec)
    register_sisa_handlers(app, spec)
    return app


def make_server_app(overrides: Mapping[str, Any] | None = None) -> ServerApp:
    """The App's ServerApp: train, unlearn, retrain and report as the run-config says."""
    app = ServerApp()
    extra = dict(overrides or {})

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        run_experiment(grid, AppConfig.from_run_config({**context.run_config, **extra}))

    _freeze_imported_objects()
    return app


def _freeze_imported_objects() -> None:
    """Exclude the objects alive now from the garbage collector's full collections (``gc.freeze``).

    torch, flwr and datasets leave about 550,000 long-lived objects, and each full collection walks them all:
    0.27-0.45 s, measured in the client actors and the ServerApp, at moments the collector picks (mid-round, or
    in the middle of a sub-second unlearning round trip). Frozen, they are never walked; objects created later
    (messages, models, tensors) are collected as before. Garbage is collected first, so none is kept.
    """
    gc.collect()
    gc.freeze()


_started = False  # per process: the first message was handled (a Ray actor unpickles the ClientApp, never builds it)


def freeze_after_startup(msg: Message, context: Context, call_next: Handler) -> Message:
    """ClientApp mod: freeze the process's long-lived objects before and after its first message.

    Before: what the imports made. After: what the first handler loaded on demand (the dataset, its modules).
    Both are one-off costs at a client's start; every later message skips the collector's 0.3 s walks.
    """
    global _started
    if _started:
        return call_next(msg, context)
    _freeze_imported_objects()
    try:
        return call_next(msg, context)
    finally:
        _started = True
        _freeze_imported_objects()
