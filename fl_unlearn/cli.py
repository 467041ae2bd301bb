"""``fl-unlearn``: the Hydra experiment launcher around the Flower App ``simulations/cifar100_fedavg``.

One job = one ``flwr run`` of the App on its own local SuperLink (``scripts/flwr_run.sh``, which reads the run
status and stops the SuperLink). The composed Hydra config is turned into the App's run-config through one
explicit table (:data:`RUN_CONFIG_KEYS`) plus ``--federation-config`` (:data:`FEDERATION_KEYS`); a leaf key in
neither table nor in :data:`LAUNCHER_ONLY` is an error before anything runs, and so is a mapped key the App
does not declare in its ``[tool.flwr.app.config]``. The App writes ``results.json``, ``report.md`` and
``lineage.png`` into the job directory (its ``out-dir``); the launcher adds ``accuracy.png``, ``job.json``
(status, reason, seconds) and ``flwr_run.log``.

Inheritance depth (``unlearning.depth``): the generations of inherited models downstream of the roots. Depth 1
is the federation's own models (every round's global and local models); depth ``d > 1`` adds a chain of
``d - 1`` derived models per client below the final global model (``derive=<unlearning.derive>`` with
``derive-depth=d-1``; ``unlearning.derive=none`` becomes ``finetune``). See :func:`inheritance`.

A job that does not finish (run status other than ``finished:completed``, no ``results.json``, a bad config)
is recorded as failed in ``job.json``; a single run then exits non-zero with the reason, while in a sweep
(``-m``) the job returns normally so that the sweep goes on and :mod:`fl_unlearn.sweep` reports it in
``sweep.csv``. This module never imports flwr: the App runs in a subprocess.

Examples
--------
::

    fl-unlearn dataset=mnist federation.num_clients=4 federation.rounds=3
    fl-unlearn -m federation.num_clients=2,4 unlearning.depth=1,2 dataset=mnist
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time
import tomllib
import traceback
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from fl_unlearn.errors import ConfigError, UnlearnError

log = logging.getLogger(__name__)

#: The repository (the package is installed editable); conf/, the App and the run script are found from here.
REPO = Path(__file__).resolve().parents[1]
CONF_DIR = REPO / "conf"
DEFAULT_APP_DIR = REPO / "simulations" / "cifar100_fedavg"
DEFAULT_RUNNER = REPO / "scripts" / "flwr_run.sh"
#: Files the launcher writes into every job directory (beside the App's results.json, report.md, lineage.*).
JOB_RECORD, RUN_LOG, RUN_CONFIG_FILE = "job.json", "flwr_run.log", "run_config.toml"
COMPLETED = "finished:completed"
STATUS_PREFIX = "flwr_run: run status:"

Convert = Callable[[Any, str], Any]


# --------------------------------------------------------------------------------------------------------
# value conversions (Hydra value, Hydra key) -> run-config scalar
# --------------------------------------------------------------------------------------------------------


def _int(value: Any, key: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{key} must be an integer, got {value!r}")
    return value


def _float(value: Any, key: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{key} must be a number, got {value!r}")
    return float(value)


def _bool(value: Any, key: str) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"{key} must be true or false, got {value!r}")
    return value


def _text(value: Any, key: str) -> str:
    """Strings pass; ``null`` is the App's empty string ("not set")."""
    if value is None:
        return ""
    if isinstance(value, (dict, list)):
        raise ConfigError(f"{key} must be a single value, got {value!r}")
    return str(value)


def _on_off(value: Any, key: str) -> str:
    """``auto`` | ``on`` | ``off``; YAML 1.1 reads a bare ``on`` / ``off`` in a conf file as a boolean."""
    if isinstance(value, bool):
        return "on" if value else "off"
    return _text(value, key)


def _path(value: Any, key: str) -> str:
    """An absolute path (relative ones are taken from the directory fl-unlearn was started in); null = ""."""
    text = _text(value, key)
    return str(Path(text).expanduser().resolve()) if text else ""


def _comma_list(value: Any, key: str, cast: Callable[[str], Any], what: str) -> str:
    """A YAML list (or one value, or ``"a,b"``) -> the App's comma string, each item through ``cast``."""
    items = value if isinstance(value, (list, tuple)) else str(value).replace(" ", "").split(",")
    try:
        return ",".join(str(cast(i)) for i in items if str(i) != "")
    except ValueError as err:
        raise ConfigError(f"{key} must be a list of {what}, got {value!r}") from err


def _int_list(value: Any, key: str) -> str:
    """``[3, 7]`` (or ``3`` or ``"3,7"``) -> ``"3,7"``."""
    return _comma_list(value, key, int, "integers like [3,7]")


def _float_list(value: Any, key: str) -> str:
    """``[1, 0.5, 0]`` (or ``0`` or ``"1,0.5,0"``) -> ``"1.0,0.5,0.0"``."""
    return _comma_list(value, key, float, "numbers like [1,0.5,0]")


def _alpha(value: Any, key: str) -> float | str:
    """A number, or ``"auto"`` passed through (the App calibrates alpha per model)."""
    if isinstance(value, str) and value.strip().lower() == "auto":
        return "auto"
    try:
        return _float(float(value) if isinstance(value, str) else value, key)
    except ValueError as err:
        raise ConfigError(f"{key} must be a number or 'auto', got {value!r}") from err


# --------------------------------------------------------------------------------------------------------
# the mapping
# --------------------------------------------------------------------------------------------------------

#: Hydra key -> (the App's run-config key, conversion). ``unlearning.derive`` and ``unlearning.depth`` are
#: converted together afterwards by :func:`inheritance`; a null ``out_dir`` becomes the Hydra job directory.
RUN_CONFIG_KEYS: dict[str, tuple[str, Convert]] = {
    "seed": ("seed", _int),
    "mode": ("mode", _text),
    "out_dir": ("out-dir", _path),
    "store_dir": ("store-dir", _path),
    "dataset.name": ("dataset", _text),
    "dataset.fallback": ("dataset-fallback", _text),
    "dataset.cache_dir": ("dataset-cache-dir", _path),
    "dataset.max_train_samples": ("max-train-samples", _int),
    "dataset.max_test_samples": ("max-test-samples", _int),
    "model.name": ("model", _text),
    "federation.num_clients": ("num-clients", _int),
    "federation.rounds": ("num-server-rounds", _int),
    "federation.fraction": ("fraction-train", _float),
    "federation.strategy": ("strategy", _text),
    "federation.proximal_mu": ("proximal-mu", _float),
    "federation.server_lr": ("server-lr", _float),
    "federation.local_epochs": ("local-epochs", _int),
    "federation.batch_size": ("batch-size", _int),
    "federation.lr": ("lr", _float),
    "federation.momentum": ("momentum", _float),
    "federation.partitioner": ("partitioner", _text),
    "federation.dirichlet_alpha": ("dirichlet-alpha", _float),
    "federation.classes_per_partition": ("classes-per-partition", _int),
    "federation.dp_noise_multiplier": ("dp-noise-multiplier", _float),
    "federation.dp_max_grad_norm": ("dp-max-grad-norm", _float),
    "request.kind": ("request-kind", _text),
    "request.classes": ("forget-classes", _int_list),
    "request.clients": ("forget-clients", _int_list),
    "request.samples_file": ("forget-samples", _path),
    "request.backdoor_fraction": ("backdoor-fraction", _float),
    "request.backdoor_target": ("backdoor-target", _int),
    "mia_samples": ("mia-samples", _int),
    "unlearning.method": ("method", _text),
    "unlearning.alpha": ("fiun-alpha", _alpha),
    "unlearning.lam": ("fiun-lambda", _float),
    "unlearning.calibration_samples": ("calibration-samples", _int),
    "unlearning.calibration_forget_samples": ("calibration-forget-samples", _int),
    "unlearning.calibration_retain_samples": ("calibration-retain-samples", _int),
    "unlearning.calibration_check_samples": ("calibration-check-samples", _int),
    "unlearning.calibration_forget_tolerance": ("calibration-forget-tolerance", _float),
    "unlearning.calibration_kept_tolerance": ("calibration-kept-tolerance", _float),
    "unlearning.calibration_alphas_per_octave": ("calibration-alphas-per-octave", _int),
    "unlearning.calibration_lambdas": ("calibration-lambdas", _float_list),
    "unlearning.fisher_layers": ("fisher-layers", _text),
    "unlearning.fisher_estimator": ("fisher-estimator", _text),
    "unlearning.fisher_samples": ("fisher-samples", _int),
    "unlearning.retain_fisher": ("retain-fisher", _text),
    "unlearning.retain_fisher_samples": ("retain-fisher-samples", _int),
    "unlearning.mfim_mode": ("mfim-mode", _text),
    "unlearning.derive": ("derive", _text),
    "unlearning.depth": ("derive-depth", _int),
    "unlearning.retrain_baseline": ("retrain-baseline", _bool),
    "unlearning.erase_superseded": ("erase-superseded", _bool),
    "unlearning.sisa_shards": ("sisa-shards", _int),
    "unlearning.sisa_slices": ("sisa-slices", _int),
    "unlearning.rounds_per_stage": ("rounds-per-stage", _int),
    "unlearning.hybrid_budget": ("hybrid-budget", _float),
    "unlearning.hybrid_policy": ("hybrid-policy", _text),
    "unlearning.ohs": ("ohs", _bool),
    "unlearning.repair": ("repair", _on_off),
    "unlearning.repair_scope": ("repair-scope", _text),
    "unlearning.repair_stop": ("repair-stop", _text),
    "unlearning.repair_part": ("repair-part", _text),
    "unlearning.repair_budget": ("repair-budget", _float),
    "unlearning.repair_rounds": ("repair-rounds", _int),
    "unlearning.repair_steps": ("repair-steps", _int),
    "unlearning.repair_lr": ("repair-lr", _float),
    "unlearning.repair_samples": ("repair-samples", _int),
    "unlearning.repair_forget_weight": ("repair-forget-weight", _float),
    "unlearning.baseline_rounds": ("baseline-rounds", _int),
    "unlearning.baseline_steps": ("baseline-steps", _int),
    "unlearning.baseline_lr": ("baseline-lr", _float),
    "unlearning.baseline_samples": ("baseline-samples", _int),
    "unlearning.ascent_loss_ceiling": ("ascent-loss-ceiling", _float),
}

#: Hydra key -> key of ``--federation-config`` (``num_clients`` goes to both: num-clients = num-supernodes).
FEDERATION_KEYS: dict[str, tuple[str, Convert]] = {
    "federation.num_clients": ("num-supernodes", _int),
    "federation.client_cpus": ("client-resources-num-cpus", _int),
}

#: Hydra keys the launcher reads itself; the App never sees them.
LAUNCHER_ONLY: dict[str, str] = {
    "app_dir": "the Flower App to run (null = simulations/cifar100_fedavg of this repository)",
    "runner": "script run as `<runner> <app_dir> <flwr run args>` (null = scripts/flwr_run.sh)",
    "stream_output": "echo the App's output while it runs (it always goes to <job dir>/flwr_run.log)",
}
#: ``unlearning.method`` values the App runs (its ``method`` key; ``strategies.config.METHODS``, kept in step by a
#: test): fiun, the baselines finetune and gradient_ascent, retrain, and sisa (the SISA exact path).
METHODS = ("fiun", "finetune", "gradient_ascent", "retrain", "sisa")


@dataclasses.dataclass(frozen=True)
class AppArgs:
    """What one job passes to the runner: the App's run-config and federation-config, and where."""

    app_dir: Path
    runner: Path
    run_config: dict[str, bool | int | float | str]
    federation_config: dict[str, int]
    out_dir: Path
    stream_output: bool = True

    def federation_config_text(self) -> str:
        """``"num-supernodes=4 client-resources-num-cpus=1"``."""
        return " ".join(f"{k}={v}" for k, v in self.federation_config.items())

    def argv(self, run_config_file: Path) -> list[str]:
        """The runner's argv (an argv list, never a shell string)."""
        return ["bash", str(self.runner), str(self.app_dir), "--run-config", str(run_config_file),
                "--federation-config", self.federation_config_text()]


def flatten(config: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested plain dict -> ``{"federation.num_clients": 4, ...}`` (lists are leaves).

    >>> flatten({"a": 1, "b": {"c": [1, 2]}})
    {'a': 1, 'b.c': [1, 2]}
    """
    flat: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def unmapped_keys(flat: Mapping[str, Any]) -> list[str]:
    """Leaf keys that no table maps and that are not launcher-only (each would be silently ignored)."""
    known = set(RUN_CONFIG_KEYS) | set(FEDERATION_KEYS) | set(LAUNCHER_ONLY)
    return sorted(k for k in flat if k not in known)


def inheritance(derive: str, depth: int) -> tuple[str, int]:
    """``(derive, derive-depth)`` of the App for ``unlearning.derive`` and ``unlearning.depth``.

    Depth counts generations of inherited models downstream of the roots: depth 1 is the federation's own
    models; depth ``d > 1`` adds a chain of ``d - 1`` models per client derived from the final global model
    (each from the one before), of kind ``derive`` (``none`` -> ``finetune``).

    >>> inheritance("none", 1), inheritance("none", 3), inheritance("incremental", 2)
    (('none', 1), ('finetune', 2), ('incremental', 1))
    """
    if depth < 1:
        raise ConfigError(f"unlearning.depth must be >= 1 (1 = the federation's own models), got {depth}")
    if depth == 1:
        if derive != "none":
            raise ConfigError(f"unlearning.derive={derive!r} builds at least one derived generation, so "
                              "unlearning.depth must be >= 2 (depth 1 = the federation's own models only)")
        return "none", 1  # derive-depth is unused without derive; the App wants it >= 1
    return (derive if derive != "none" else "finetune"), depth - 1


def app_config_keys(app_dir: Path) -> dict[str, Any]:
    """The run-config keys (and defaults) the App declares in its ``[tool.flwr.app.config]``."""
    pyproject = app_dir / "pyproject.toml"
    if not pyproject.is_file():
        raise ConfigError(f"app_dir={str(app_dir)!r} holds no pyproject.toml; point app_dir at a Flower App")
    with pyproject.open("rb") as f:
        return dict(tomllib.load(f).get("tool", {}).get("flwr", {}).get("app", {}).get("config", {}))


def _launcher_path(value: Any, default: Path, key: str, cwd: Path) -> Path:
    path = default if value is None else (cwd / Path(str(value)).expanduser()).resolve()
    if not path.exists():
        raise ConfigError(f"{key}={str(path)!r} does not exist")
    return path


def build_app_args(config: Mapping[str, Any], job_dir: Path, *, cwd: Path | None = None) -> AppArgs:
    """Turn a composed config (plain nested dict) into the App's run-config and federation-config.

    Checks everything before anything runs: unmapped keys, types, depth, method, and that every mapped key
    is one the App declares.

    Raises
    ------
    ConfigError
        With the offending key and what to do.
    """
    cwd = cwd or Path.cwd()
    flat = flatten(config)
    unknown = unmapped_keys(flat)
    if unknown:
        raise ConfigError(f"config keys {unknown} are not mapped to the App; map them in RUN_CONFIG_KEYS or "
                          "LAUNCHER_ONLY of fl_unlearn/cli.py (nothing was run)")
    method = flat.get("unlearning.method", "fiun")
    if method not in METHODS:
        raise ConfigError(f"unlearning.method={method!r}: the App runs {', '.join(METHODS)} (nothing was run)")
    run_config = {rc_key: convert(flat[key], key) for key, (rc_key, convert) in RUN_CONFIG_KEYS.items()
                  if key in flat}
    if "unlearning.depth" in flat:
        run_config["derive"], run_config["derive-depth"] = inheritance(
            str(run_config.get("derive", "none")), int(run_config["derive-depth"]))
    out_dir = Path(run_config.get("out-dir") or job_dir).resolve()
    run_config["out-dir"] = str(out_dir)
    federation = {fc_key: convert(flat[key], key) for key, (fc_key, convert) in FEDERATION_KEYS.items()
                  if key in flat}
    app_dir = _launcher_path(flat.get("app_dir"), DEFAULT_APP_DIR, "app_dir", cwd)
    declared = app_config_keys(app_dir)
    missing = sorted(set(run_config) - set(declared))
    if missing:
        raise ConfigError(f"the App at {app_dir} declares no run-config keys {missing}; "
                          "fix the mapping in fl_unlearn/cli.py or app_dir (nothing was run)")
    return AppArgs(app_dir=app_dir, runner=_launcher_path(flat.get("runner"), DEFAULT_RUNNER, "runner", cwd),
                   run_config=run_config, federation_config=federation, out_dir=out_dir,
                   stream_output=bool(flat.get("stream_output", True)))


# --------------------------------------------------------------------------------------------------------
# running one job
# --------------------------------------------------------------------------------------------------------


def toml_scalar(value: bool | int | float | str) -> str:
    """One run-config value in TOML (strings as basic strings; JSON escaping is valid TOML there)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        if value != value or value in (float("inf"), float("-inf")):
            raise ConfigError(f"run-config values must be finite, got {value!r}")
        return repr(value)
    return json.dumps(str(value), ensure_ascii=False)


def write_run_config(run_config: Mapping[str, Any], path: Path) -> Path:
    """The run-config as a TOML file for ``flwr run --run-config <file>`` (no quoting through a shell)."""
    path.write_text("".join(f"{key} = {toml_scalar(value)}\n" for key, value in run_config.items()))
    return path


#: ``runner(argv, log_path, stream) -> exit status``; the real one is :func:`run_subprocess`.
Runner = Callable[[Sequence[str], Path, bool], int]


def run_subprocess(argv: Sequence[str], log_path: Path, stream: bool) -> int:
    """Run ``argv`` with the venv's bin/ first on PATH, its output into ``log_path`` (and echoed if ``stream``).

    Interrupted (Ctrl-C, or SIGTERM to this process), it sends the runner SIGTERM, on which
    ``scripts/flwr_run.sh`` stops the SuperLink it started, waits for it, and raises ``KeyboardInterrupt``.
    """
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    env.pop("FLWR_HOME", None)  # the runner makes its own
    with _sigterm_interrupts(), log_path.open("w", buffering=1) as sink, subprocess.Popen(
        list(argv), cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
    ) as proc:
        assert proc.stdout is not None
        try:
            for line in proc.stdout:
                sink.write(line)
                if stream:
                    sys.stdout.write(line)
                    sys.stdout.flush()
        except BaseException:
            _stop_runner(proc)
            raise
    return proc.returncode


@contextlib.contextmanager
def _sigterm_interrupts() -> Iterator[None]:
    """SIGTERM raises ``KeyboardInterrupt`` here, as Ctrl-C does (by default it would end this process at once and
    leave the runner, and the SuperLink, to find out only when their output has no reader)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _stop_runner(proc: subprocess.Popen, grace_s: float = 60.0) -> None:
    """SIGTERM, then wait (the runner stops its SuperLink first); SIGKILL only if it does not end in ``grace_s``."""
    if proc.poll() is not None:
        return
    log.warning("fl-unlearn: interrupted; stopping the run (pid %d) and its SuperLink", proc.pid)
    proc.terminate()
    try:
        proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


class RunFailed(UnlearnError):
    """The App's run did not finish with ``finished:completed`` or left no results."""


_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def failure_reason(log_text: str, returncode: int) -> str:
    """The runner's run status line (with Flower's status details), else the App's last error line.

    >>> failure_reason("flwr_run: run status: finished:failed (Simulation failed: Unknown class [42])", 1)
    'run status finished:failed (Simulation failed: Unknown class [42])'
    """
    lines = [_ANSI.sub("", ln).strip() for ln in log_text.splitlines()]
    lines = [ln for ln in lines if ln]
    status = next((ln[len(STATUS_PREFIX):].strip() for ln in reversed(lines) if ln.startswith(STATUS_PREFIX)),
                  None)
    reason = f"run status {status}" if status else f"runner exited {returncode} without a run status"
    has_details = status is not None and "(" in status and not status.endswith("(N/A)")
    errors = [ln for ln in lines if "Error" in ln or "ERROR" in ln or "Exception" in ln]
    if errors and not has_details:
        reason += f"; last error: {errors[-1][:300]}"
    return reason


def _check_run(returncode: int, log_path: Path, out_dir: Path) -> dict[str, Any]:
    text = log_path.read_text() if log_path.exists() else ""
    if returncode != 0:
        raise RunFailed(failure_reason(text, returncode))
    results = out_dir / "results.json"
    if not results.is_file():
        raise RunFailed(f"run status {COMPLETED}, but no results.json in {out_dir}")
    return json.loads(results.read_text())


def job_settings(config: Mapping[str, Any]) -> dict[str, Any]:
    """The settings a sweep table and its plots are drawn against (raw Hydra values)."""
    flat = flatten(config)
    keys = ("dataset.name", "federation.num_clients", "federation.rounds", "unlearning.depth",
            "unlearning.method", "request.kind")
    return {k: flat.get(k) for k in keys}


def run_job(config: Mapping[str, Any], job_dir: Path, *, overrides: Sequence[str] = (),
            runner: Runner = run_subprocess, cwd: Path | None = None) -> dict[str, Any]:
    """Run one job; never raises for a failed run: returns (and writes to ``job.json``) its record.

    The record holds ``status`` (``ok`` | ``failed``), ``reason``, ``seconds``, the job's ``overrides`` and
    ``settings`` (:func:`job_settings`). A config error is found before the runner is called.
    """
    job_dir = Path(job_dir).resolve()
    job_dir.mkdir(parents=True, exist_ok=True)
    record: dict[str, Any] = {"status": "failed", "reason": "", "seconds": 0.0, "overrides": list(overrides),
                              "settings": job_settings(config), "job_dir": str(job_dir)}
    start = time.perf_counter()
    try:
        args = build_app_args(config, job_dir, cwd=cwd)
        record["out_dir"] = str(args.out_dir)
        argv = args.argv(write_run_config(args.run_config, job_dir / RUN_CONFIG_FILE))
        log.info("fl-unlearn: job started (%s): %s -> %s", " ".join(overrides) or "defaults",
                 args.federation_config_text(), args.out_dir)
        results = _check_run(runner(argv, job_dir / RUN_LOG, args.stream_output), job_dir / RUN_LOG, args.out_dir)
        _plot_job(results, job_dir)
        record.update(status="ok", reason="")
    except (UnlearnError, OSError) as err:
        record["reason"] = str(err)
    except Exception as err:  # a bug must not end a sweep either; the traceback goes to the job log
        log.error("fl-unlearn: unexpected error\n%s", traceback.format_exc())
        record["reason"] = f"{type(err).__name__}: {err}"
    record["seconds"] = round(time.perf_counter() - start, 1)
    (job_dir / JOB_RECORD).write_text(json.dumps(record, indent=2))
    log.log(logging.INFO if record["status"] == "ok" else logging.ERROR, "fl-unlearn: job %s in %.0f s%s",
            record["status"], record["seconds"],
            f": {record['reason']}" if record["reason"] else f"; results in {record.get('out_dir')}")
    return record


def _plot_job(results: Mapping[str, Any], job_dir: Path) -> None:
    from fl_unlearn.sweep import plot_job_accuracy  # noqa: PLC0415  (matplotlib only when a run succeeded)

    plot_job_accuracy(results, job_dir / "accuracy.png")


# --------------------------------------------------------------------------------------------------------
# the Hydra app
# --------------------------------------------------------------------------------------------------------


def _hydra_main() -> Callable[[], Any]:
    import hydra  # noqa: PLC0415
    from hydra.core.hydra_config import HydraConfig  # noqa: PLC0415
    from hydra.types import RunMode  # noqa: PLC0415
    from omegaconf import DictConfig, OmegaConf  # noqa: PLC0415

    @hydra.main(config_path=str(CONF_DIR), config_name="config", version_base="1.3")
    def job(cfg: DictConfig) -> dict[str, Any]:
        hydra_cfg = HydraConfig.get()
        config = OmegaConf.to_container(cfg, resolve=True)
        assert isinstance(config, dict)
        record = run_job(config, Path(hydra_cfg.runtime.output_dir), overrides=list(hydra_cfg.overrides.task))
        if record["status"] != "ok" and hydra_cfg.mode != RunMode.MULTIRUN:
            # A single run fails loudly; in a sweep the record becomes a failed row and the sweep goes on.
            raise SystemExit(f"fl-unlearn: job failed: {record['reason']}\n(job directory: {record['job_dir']})")
        return record

    return job


def main() -> None:
    """Console script ``fl-unlearn``: Hydra parses ``sys.argv`` (``--help``, ``-m``, overrides)."""
    if not (CONF_DIR / "config.yaml").is_file():
        raise SystemExit(f"fl-unlearn: no conf/config.yaml at {CONF_DIR}; the launcher runs from the repository "
                         "(install the project editable: pip install -e .)")
    try:
        _hydra_main()()
    except KeyboardInterrupt:  # the run and its SuperLink are stopped already (run_subprocess)
        print("fl-unlearn: interrupted; the run was stopped", file=sys.stderr)
        raise SystemExit(130) from None


if __name__ == "__main__":
    main()
