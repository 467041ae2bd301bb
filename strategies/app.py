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


def _config(context: Context) -> AppConfig:
    return AppConfig.from_run_config(context.run_config)


def _data(context: Context) -> FederatedData:
    cfg = _config(context)
    return load_with_fallback(cfg.data_config(), cfg.dataset_fallback or None)[0]  # cached per process


def app_model(context: Context) -> nn.Module:
    """The App's model for this run's data (``model=auto``: cnn for grey images, resnet18 for colour)."""
    return _model_factory(_config(context), _data(context))[1]()


def app_partition(context: Context) -> Dataset:
    """This client's partition of the App's data."""
    return _data(context).partition(partition_id(context))


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
    app = ClientApp(mods=[with_run_config(overrides), sisa_mod(spec)])  # sisa_mod: `train` rounds of a shard-model
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

    return app
