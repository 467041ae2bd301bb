"""The Flower App's run-config: keys, defaults, and a typed view of them.

``DEFAULTS`` mirrors ``[tool.flwr.app.config]`` of ``simulations/cifar100_fedavg/pyproject.toml`` (a test
keeps the two in step). ``run_simulation`` gives an empty ``context.run_config``, so the apps merge it over
these defaults; ``flwr run`` refuses unknown keys itself.

Examples
--------
>>> cfg = AppConfig.from_run_config({"dataset": "mnist", "forget-classes": "3,7"})
>>> cfg.dataset, cfg.forget_classes, cfg.resolved_model(grey=True)
('mnist', (3, 7), 'cnn')
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from fl_unlearn.calibrate import REPAIR_PARTS, REPAIR_STOPS
from fl_unlearn.errors import ConfigError
from fl_unlearn.fisher import ESTIMATORS

#: Run-config keys and their defaults (flat scalars; lists as comma strings).
DEFAULTS: dict[str, bool | int | float | str] = {
    "dataset": "cifar100",
    "dataset-fallback": "mnist",
    "dataset-cache-dir": "",
    "max-train-samples": 0,
    "max-test-samples": 0,
    "model": "auto",
    "num-clients": 4,
    "num-server-rounds": 3,
    "fraction-train": 1.0,
    "strategy": "fedavg",
    "proximal-mu": 0.01,
    "server-lr": 0.1,
    "local-epochs": 1,
    "batch-size": 32,
    "lr": 0.05,
    "momentum": 0.9,
    "partitioner": "iid",
    "dirichlet-alpha": 0.5,
    "classes-per-partition": 2,
    "seed": 42,
    "mode": "train+unlearn",
    "request-kind": "classes",
    "forget-classes": "3",
    "forget-clients": "0",
    "forget-samples": "",
    "backdoor-fraction": 0.0,
    "backdoor-target": 7,
    "mia-samples": 500,
    "method": "fiun",
    "fiun-alpha": "auto",
    "calibration-samples": 500,
    "calibration-forget-samples": 64,
    "calibration-retain-samples": 32,
    "calibration-check-samples": 32,
    "calibration-forget-tolerance": 0.03,
    "calibration-kept-tolerance": 0.01,
    "calibration-alphas-per-octave": 2,
    "calibration-lambdas": "1,0",
    "repair": "auto",
    "repair-scope": "all",
    "repair-stop": "stall",
    "repair-part": "all",
    "repair-budget": 1.0,
    "repair-rounds": 16,
    "repair-steps": 8,
    "repair-lr": 0.02,
    "repair-samples": 1024,
    "repair-forget-weight": 1.0,
    "baseline-rounds": 2,
    "baseline-steps": 25,
    "baseline-lr": 0.05,
    "baseline-samples": 1024,
    "ascent-loss-ceiling": 5.0,
    "fiun-lambda": 1.0,
    "fisher-layers": "all",
    "fisher-estimator": "expected",
    "fisher-samples": 512,
    "retain-fisher": "prepared",
    "retain-fisher-samples": 1024,
    "mfim-mode": "weighted_mean",
    "derive": "none",
    "derive-depth": 1,
    "retrain-baseline": True,
    "erase-superseded": True,
    "out-dir": "",
    "store-dir": "",
    "dp-noise-multiplier": 0.0,
    "dp-max-grad-norm": 0.0,
    "sisa-shards": 1,
    "sisa-slices": 1,
    "rounds-per-stage": 1,
    "hybrid-budget": 0.6,
    "hybrid-policy": "auto",
    "ohs": False,
}

MODES = ("train", "unlearn", "train+unlearn")
REQUEST_KINDS = ("classes", "client", "samples")
DERIVE_KINDS = ("none", "finetune", "incremental", "transfer")
STRATEGIES = ("fedavg", "fedprox", "fedadam")
RETAIN_SOURCES = ("prepared", "fresh", "accumulated")
HYBRID_POLICIES = ("auto", "exact", "approximate")
#: Finest calibration grid accepted: 16 alphas per factor of 2 (145 alphas per lambda; each costs forward passes).
MAX_ALPHAS_PER_OCTAVE = 16
REPAIR_MODES = ("auto", "on", "off")
#: ``method``: fiun (ours); finetune and gradient_ascent (strategies.baseline, through the same journal); retrain (the
#: federation trained again without the data: the gold standard, timed as the method); sisa (the SISA exact path:
#: needs sisa-shards or sisa-slices > 1)
METHODS = ("fiun", "finetune", "gradient_ascent", "retrain", "sisa")
#: ``repair-scope``: ``served``, the served global model and the client-held ones; ``all``, also every other
#: server-held affected model (local updates at the client that trained them, earlier globals at every client)
REPAIR_SCOPES = ("served", "all")
# ``repair-stop`` (REPAIR_STOPS, from fl_unlearn.calibrate): ``stall``, stop when the validation loss stalls;
# ``restore``, also once the kept validation loss is back at the model's before unlearning (RepairConfig.stop; half the
# repair time, measured to keep up to 2.3 points less on benchmarks/baselines.py's network).
# ``repair-part`` (REPAIR_PARTS, from fl_unlearn.calibrate): ``all`` weights train; ``head``, only the model's head
# (RepairConfig.part; benchmarks/baselines.py: the same kept accuracy on the models it repairs, in a fraction of the
# time).
#: Environment variable naming the parent of default output directories (``out-dir=""``).
RUNS_ENV = "FL_UNLEARN_RUNS_DIR"


def check_repair_budget(fraction: float) -> None:
    """``repair-budget``: a finite fraction >= 0 of the training run's ``train_s`` (0: no limit)."""
    if not (fraction >= 0 and math.isfinite(fraction)):
        raise ConfigError(f"repair-budget must be a finite number >= 0 (a fraction of the training run's train_s; "
                          f"0: no limit), got {fraction}")


def _comma_list(text: str, key: str, cast: Callable[[str], Any], example: str) -> tuple:
    try:
        return tuple(cast(t) for t in str(text).replace(" ", "").split(",") if t)
    except ValueError as err:
        raise ConfigError(f"{key} must be a comma list of {example}; got {text!r}") from err


def _int_list(text: str, key: str) -> tuple[int, ...]:
    return _comma_list(text, key, int, "integers like '3,7'")


def _float_list(text: str, key: str) -> tuple[float, ...]:
    return _comma_list(text, key, float, "numbers like '1,0.5,0'")


def _choice(value: str, options: tuple[str, ...], key: str) -> str:
    if value not in options:
        raise ConfigError(f"{key}={value!r} is not one of {', '.join(options)}")
    return value


@dataclasses.dataclass(frozen=True)
class AppConfig:
    """A checked, typed view of the run-config (field = key with ``-`` as ``_``)."""

    dataset: str
    dataset_fallback: str
    dataset_cache_dir: str
    max_train_samples: int
    max_test_samples: int
    model: str
    num_clients: int
    num_server_rounds: int
    fraction_train: float
    strategy: str
    proximal_mu: float
    server_lr: float
    local_epochs: int
    batch_size: int
    lr: float
    momentum: float
    partitioner: str
    dirichlet_alpha: float
    classes_per_partition: int
    seed: int
    mode: str
    request_kind: str
    forget_classes: tuple[int, ...]
    forget_clients: tuple[int, ...]
    forget_samples: str
    backdoor_fraction: float
    backdoor_target: int
    mia_samples: int
    method: str
    fiun_alpha: float | str
    calibration_samples: int
    calibration_forget_samples: int
    calibration_retain_samples: int
    calibration_check_samples: int
    calibration_forget_tolerance: float
    calibration_kept_tolerance: float
    calibration_alphas_per_octave: int
    calibration_lambdas: tuple[float, ...]
    repair: str
    repair_scope: str
    repair_stop: str
    repair_part: str
    repair_budget: float
    repair_rounds: int
    repair_steps: int
    repair_lr: float
    repair_samples: int
    repair_forget_weight: float
    baseline_rounds: int
    baseline_steps: int
    baseline_lr: float
    baseline_samples: int
    ascent_loss_ceiling: float
    fiun_lambda: float
    fisher_layers: str
    fisher_estimator: str
    fisher_samples: int
    retain_fisher: str
    retain_fisher_samples: int
    mfim_mode: str
    derive: str
    derive_depth: int
    retrain_baseline: bool
    erase_superseded: bool
    out_dir: str
    store_dir: str
    dp_noise_multiplier: float
    dp_max_grad_norm: float
    sisa_shards: int
    sisa_slices: int
    rounds_per_stage: int
    hybrid_budget: float
    hybrid_policy: str
    ohs: bool

    @classmethod
    def from_run_config(cls, run_config: Mapping[str, Any] | None = None, **overrides: Any) -> AppConfig:
        """Merge ``run_config`` (and keyword overrides, ``_`` for ``-``) over ``DEFAULTS`` and check it."""
        merged: dict[str, Any] = dict(DEFAULTS)
        merged.update(run_config or {})
        merged.update({k.replace("_", "-"): v for k, v in overrides.items()})
        unknown = sorted(set(merged) - set(DEFAULTS))
        if unknown:
            raise ConfigError(f"unknown run-config keys {unknown}; known: {sorted(DEFAULTS)}")
        values = {k.replace("-", "_"): _coerce(DEFAULTS[k], v, k) for k, v in merged.items()}
        values["forget_classes"] = _int_list(values["forget_classes"], "forget-classes")
        values["forget_clients"] = _int_list(values["forget_clients"], "forget-clients")
        values["calibration_lambdas"] = _float_list(values["calibration_lambdas"], "calibration-lambdas")
        cfg = cls(**values)
        cfg._check()
        return cfg

    def _check(self) -> None:
        _choice(self.mode, MODES, "mode")
        _choice(self.request_kind, REQUEST_KINDS, "request-kind")
        _choice(self.derive, DERIVE_KINDS, "derive")
        _choice(self.strategy, STRATEGIES, "strategy")
        _choice(self.retain_fisher, RETAIN_SOURCES, "retain-fisher")
        _choice(self.hybrid_policy, HYBRID_POLICIES, "hybrid-policy")
        _choice(self.repair, REPAIR_MODES, "repair")
        _choice(self.repair_scope, REPAIR_SCOPES, "repair-scope")
        _choice(self.repair_stop, REPAIR_STOPS, "repair-stop")
        _choice(self.repair_part, REPAIR_PARTS, "repair-part")
        if self.repair_rounds < 0 or self.repair_steps < 1 or self.repair_lr <= 0 or self.repair_samples < 2:
            raise ConfigError("repair-rounds must be >= 0, repair-steps >= 1, repair-lr > 0 and repair-samples >= 2; "
                              f"got {self.repair_rounds}, {self.repair_steps}, {self.repair_lr}, {self.repair_samples}")
        check_repair_budget(self.repair_budget)
        if not (self.repair_forget_weight >= 0 and math.isfinite(self.repair_forget_weight)):
            raise ConfigError(f"repair-forget-weight must be a finite number >= 0 (0: repair on kept data only), "
                              f"got {self.repair_forget_weight}")
        self._check_method()
        self._check_verification()
        if self.hybrid_budget < 0:
            raise ConfigError(f"hybrid-budget must be >= 0 (a fraction of a shard's full training cost), "
                              f"got {self.hybrid_budget}")
        if self.uses_sisa and self.request_kind == "classes" and "unlearn" in self.mode:
            raise ConfigError("sisa-shards / sisa-slices serve sample and client requests (request-kind=samples or "
                              "client); class requests take the FIUn path with sisa-shards=1 and sisa-slices=1")
        for key in ("num_clients", "num_server_rounds", "local_epochs", "batch_size", "derive_depth", "sisa_shards",
                    "sisa_slices", "rounds_per_stage"):
            if getattr(self, key) < 1:
                raise ConfigError(f"{key.replace('_', '-')} must be >= 1, got {getattr(self, key)}")
        if self.calibration_forget_samples < 1 or self.calibration_retain_samples < 0:
            raise ConfigError("calibration-forget-samples must be >= 1 and calibration-retain-samples >= 0, got "
                              f"{self.calibration_forget_samples} and {self.calibration_retain_samples}")
        if self.fisher_estimator not in ESTIMATORS:  # else the clients would fail one by one, mid-request
            raise ConfigError(f"fisher-estimator must be one of {', '.join(ESTIMATORS)}, got {self.fisher_estimator!r}")
        if self.fisher_samples < 0 or self.retain_fisher_samples < 0:
            raise ConfigError(f"fisher-samples and retain-fisher-samples must be >= 0 (0: all), got "
                              f"{self.fisher_samples} and {self.retain_fisher_samples}")
        if not 0.0 <= self.calibration_forget_tolerance < 1.0:
            raise ConfigError("calibration-forget-tolerance must be in [0, 1), got "
                              f"{self.calibration_forget_tolerance}")
        if not 0.0 <= self.calibration_kept_tolerance < 1.0:
            raise ConfigError("calibration-kept-tolerance must be in [0, 1), got "
                              f"{self.calibration_kept_tolerance}")
        if not 1 <= self.calibration_alphas_per_octave <= MAX_ALPHAS_PER_OCTAVE:
            raise ConfigError(f"calibration-alphas-per-octave must be in [1, {MAX_ALPHAS_PER_OCTAVE}] (alphas per "
                              f"factor of 2 in 0.5..512), got {self.calibration_alphas_per_octave}")
        if not self.calibration_lambdas or any(not 0.0 <= v <= 1.0 for v in self.calibration_lambdas):
            raise ConfigError(f"calibration-lambdas must be a non-empty comma list of values in [0, 1] (1: SSD's "
                              f"dampening, 0: selected weights zeroed), got {list(self.calibration_lambdas)}")
        if self.calibration_check_samples < 0:
            raise ConfigError(f"calibration-check-samples must be >= 0 (0: no per-model check), got "
                              f"{self.calibration_check_samples}")
        if self.fiun_alpha != "auto" and float(self.fiun_alpha) < 0:
            raise ConfigError(f"fiun-alpha must be 'auto' or a number >= 0, got {self.fiun_alpha!r}")
        for key in ("out_dir", "store_dir", "forget_samples", "dataset_cache_dir"):
            value = getattr(self, key)
            if value and not os.path.isabs(value):
                raise ConfigError(
                    f"{key.replace('_', '-')}={value!r} must be an absolute path: the ServerApp's working "
                    "directory is wherever the SuperLink started, not the App directory"
                )

    def _check_verification(self) -> None:
        if self.mia_samples < 0:
            raise ConfigError(f"mia-samples must be >= 0 (0: no membership inference), got {self.mia_samples}")
        if not (0.0 <= self.backdoor_fraction <= 1.0):
            raise ConfigError(f"backdoor-fraction must be in [0, 1] (0: no backdoor), got {self.backdoor_fraction}")
        if self.backdoor_fraction > 0 and self.request_kind != "client":
            raise ConfigError("backdoor-fraction poisons the clients a client request forgets (forget-clients): set "
                              f"request-kind=client, or backdoor-fraction=0 (request-kind is {self.request_kind})")
        if self.backdoor_target < 0:
            raise ConfigError(f"backdoor-target must be a class label >= 0, got {self.backdoor_target}")

    def poisons(self, partition: int) -> bool:
        """Whether ``partition`` trains on a backdoored partition (``backdoor-fraction`` > 0, a forgotten client)."""
        return self.backdoor_fraction > 0 and partition in self.forget_clients

    def _check_method(self) -> None:
        _choice(self.method, METHODS, "method")
        if self.method == "sisa" and not self.uses_sisa:
            raise ConfigError("method=sisa is the SISA exact path: set sisa-shards or sisa-slices > 1 (and "
                              "request-kind=samples or client)")
        if self.method == "sisa" and self.hybrid_policy == "approximate":
            raise ConfigError("method=sisa takes the exact path; hybrid-policy=approximate contradicts it (use "
                              "method=fiun for the hybrid planner)")
        if self.uses_sisa and self.method not in ("fiun", "sisa"):
            raise ConfigError(f"method={self.method} runs on the FedAvg lineage (sisa-shards=1, sisa-slices=1); with "
                              "SISA shards or slices the methods are fiun (the hybrid planner) and sisa (exact)")
        if min(self.baseline_rounds, self.baseline_steps, self.baseline_samples) < 1:
            raise ConfigError(f"baseline-rounds, baseline-steps and baseline-samples must be >= 1, got "
                              f"{self.baseline_rounds}, {self.baseline_steps}, {self.baseline_samples}")
        if not all(v > 0 and math.isfinite(v) for v in (self.baseline_lr, self.ascent_loss_ceiling)):
            raise ConfigError(f"baseline-lr and ascent-loss-ceiling must be finite and > 0, got {self.baseline_lr} "
                              f"and {self.ascent_loss_ceiling}")

    @property
    def uses_sisa(self) -> bool:
        """Whether the run takes the SISA / hybrid path (``strategies.sisa_server``): shards or slices > 1.

        ``S = R = 1`` keeps the plain FedAvg + FIUn path for every request kind (samples included), as before
        the SISA path existed: with one shard and one slice the exact path would be a full retraining."""
        return self.sisa_shards > 1 or self.sisa_slices > 1

    def to_run_config(self) -> dict[str, bool | int | float | str]:
        """Back to flat run-config values (lists as comma strings)."""
        out: dict[str, Any] = {}
        for key in DEFAULTS:
            value = getattr(self, key.replace("-", "_"))
            out[key] = ",".join(map(str, value)) if isinstance(value, tuple) else value
        return out

    def resolved_model(self, *, grey: bool) -> str:
        """``model``, with ``auto`` = the small ``cnn`` for grey images and ``resnet18`` for colour."""
        if self.model != "auto":
            return self.model
        return "cnn" if grey else "resnet18"

    def data_config(self, source: str | None = None) -> Any:
        """The ``fl_unlearn.data.DataConfig`` of this run (``source`` overrides ``dataset``)."""
        from fl_unlearn.data import DataConfig

        return DataConfig(
            source=source or self.dataset,
            num_partitions=self.num_clients,
            partitioner=self.partitioner,
            alpha=self.dirichlet_alpha,
            classes_per_partition=self.classes_per_partition,
            seed=self.seed,
            cache_dir=self.dataset_cache_dir or None,
            max_train=self.max_train_samples or None,
            max_test=self.max_test_samples or None,
        )

    def resolved_dirs(self) -> tuple[Path, Path]:
        """Absolute ``(out_dir, store_dir)``; empty values get a default outside the App directory.

        The default parent is ``$FL_UNLEARN_RUNS_DIR``, else ``~/.cache/fl_unlearn/runs``, with one
        timestamped directory per run; the store defaults to ``<out-dir>/store``. (``__file__`` points into
        ``$FLWR_HOME/apps`` and the cwd is the SuperLink's, so neither is a usable default.)
        """
        out = Path(self.out_dir) if self.out_dir else _default_run_dir()
        store = Path(self.store_dir) if self.store_dir else out / "store"
        return out, store


def _default_run_dir() -> Path:
    parent = Path(os.environ.get(RUNS_ENV) or Path.home() / ".cache" / "fl_unlearn" / "runs")
    return parent / time.strftime("%Y%m%d-%H%M%S")


def _coerce(default: Any, value: Any, key: str) -> Any:
    """Coerce ``value`` to the type of ``default`` (TOML gives ints for floats like ``lr=1``)."""
    if key == "fiun-alpha":
        if str(value).strip().lower() == "auto":
            return "auto"
        try:
            return float(value)
        except (TypeError, ValueError) as err:
            raise ConfigError(f"fiun-alpha must be 'auto' or a number, got {value!r}") from err
    if isinstance(default, bool):
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        if not isinstance(value, bool):
            raise ConfigError(f"{key} must be true or false, got {value!r}")
        return value
    try:
        return type(default)(value)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{key} must be a {type(default).__name__}, got {value!r}") from err
