"""The Hydra launcher ``fl-unlearn``: config -> run-config mapping, depth, job records, sweep collection.

The Flower App itself is not run here (a ``flwr run`` takes minutes); a stand-in runner takes its place where
a job has to run. The real runs are the acceptance commands in the README's "Experiments with Hydra".
"""

from __future__ import annotations

import csv
import json
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from fl_unlearn.cli import (CONF_DIR, FEDERATION_KEYS, LAUNCHER_ONLY, METHODS, RUN_CONFIG_KEYS, RUN_LOG, build_app_args,
                            failure_reason, flatten, inheritance, run_job, unmapped_keys, write_run_config)
from fl_unlearn.errors import ConfigError
from fl_unlearn.sweep import count_jobs, report_sweep
from strategies.config import DEFAULTS, METHODS as APP_METHODS, AppConfig

GROUPS = ["dataset", "model", "federation", "unlearning", "request"]
FL_UNLEARN = Path(sys.executable).parent / "fl-unlearn"


def _compose(*overrides: str) -> dict[str, Any]:
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="config", overrides=list(overrides))
    plain = OmegaConf.to_container(cfg, resolve=True)
    assert isinstance(plain, dict)
    return plain


def _results(forget_after: float, retain_after: float, unlearn_s: float) -> dict[str, Any]:
    """A results.json shaped like the App's (strategies/report.py)."""
    return {
        "final_global": {"before": {"forget_acc": 0.98, "retain_acc": 0.97},
                         "after": {"forget_acc": forget_after, "retain_acc": retain_after},
                         "retrained": {"forget_acc": 0.0, "retain_acc": 0.96}},
        "affected_models": [{"id": "global-r1", "after": {"forget_acc": forget_after + 0.01}},
                            {"id": "local-r1-p0", "after": {"forget_acc": forget_after}}],
        "timing": {"unlearn_s": unlearn_s, "retrain_s": 50.0, "train_s": 51.0},
    }


class FakeRunner:
    """Stands in for scripts/flwr_run.sh: records its calls, writes a log and (if told) a results.json."""

    def __init__(self, status: str = "finished:completed", results: dict[str, Any] | None = None) -> None:
        self.status, self.results, self.calls = status, results, []

    def __call__(self, argv, log_path: Path, stream: bool) -> int:
        self.calls.append(list(argv))
        run_config = tomllib.loads(Path(argv[argv.index("--run-config") + 1]).read_text())
        log_path.write_text(f"ERROR: ServerApp raised ConfigError: bad value\nflwr_run: run status: {self.status}\n")
        if self.results is not None:
            Path(run_config["out-dir"], "results.json").write_text(json.dumps(self.results))
        return 0 if self.status == "finished:completed" else 1


# --- the mapping --------------------------------------------------------------------------------------


def test_mapping_covers_exactly_the_apps_run_config_keys():
    mapped = {rc_key for rc_key, _ in RUN_CONFIG_KEYS.values()}
    assert mapped - set(DEFAULTS) == set(), "mapped to run-config keys the App does not have"
    assert set(DEFAULTS) - mapped == set(), "App keys no Hydra key reaches: map them in fl_unlearn/cli.py"
    assert {fc for fc, _ in FEDERATION_KEYS.values()} == {"num-supernodes", "client-resources-num-cpus"}


@pytest.mark.parametrize("group", GROUPS)
def test_every_leaf_of_every_group_option_is_mapped_or_launcher_only(group):
    for option in sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml")):
        flat = flatten(_compose(f"{group}={option}"))
        assert unmapped_keys(flat) == [], f"{group}={option}"
        assert all(k in flat for k in LAUNCHER_ONLY if "." not in k)


def test_the_launcher_accepts_exactly_the_methods_the_app_runs(tmp_path):
    assert METHODS == APP_METHODS
    for method in ("finetune", "gradient_ascent"):  # a method reaches the App as its `method` key
        rc = build_app_args(_compose(f"unlearning.method={method}", "unlearning.baseline_steps=7"), tmp_path).run_config
        assert (rc["method"], rc["baseline-steps"]) == (method, 7)
        assert AppConfig.from_run_config(rc).method == method


def test_composed_config_maps_to_a_run_config_the_app_accepts(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = _compose("dataset=mnist", "federation.num_clients=3", "federation.rounds=2", "request.classes=[3,7]",
                   "unlearning.alpha=auto", "unlearning.retrain_baseline=false", "dataset.cache_dir=cache")
    args = build_app_args(cfg, tmp_path / "job")
    rc = args.run_config
    assert (rc["dataset"], rc["num-clients"], rc["num-server-rounds"]) == ("mnist", 3, 2)
    assert args.federation_config == {"num-supernodes": 3, "client-resources-num-cpus": 1}
    assert args.federation_config_text() == "num-supernodes=3 client-resources-num-cpus=1"
    assert (rc["forget-classes"], rc["fiun-alpha"], rc["retrain-baseline"]) == ("3,7", "auto", False)
    assert rc["out-dir"] == str((tmp_path / "job").resolve())
    assert rc["dataset-cache-dir"] == str(tmp_path / "cache")
    app = AppConfig.from_run_config(rc)  # the App's own checks pass on what the launcher sends
    assert app.forget_classes == (3, 7) and app.num_clients == 3


def test_calibration_grid_keys_reach_the_app(tmp_path):
    rc = build_app_args(_compose("unlearning.calibration_alphas_per_octave=4",
                                 "unlearning.calibration_lambdas=[1,0.5,0.25,0]"), tmp_path).run_config
    assert (rc["calibration-alphas-per-octave"], rc["calibration-lambdas"]) == (4, "1.0,0.5,0.25,0.0")
    app = AppConfig.from_run_config(rc)
    assert app.calibration_lambdas == (1.0, 0.5, 0.25, 0.0)
    default = build_app_args(_compose(), tmp_path).run_config  # Hydra's defaults are the App's grid
    assert AppConfig.from_run_config(default).calibration_lambdas == (1.0, 0.0)
    assert default["calibration-alphas-per-octave"] == 2
    with pytest.raises(ConfigError, match=r"unlearning.calibration_lambdas must be a list of numbers"):
        build_app_args(_compose("unlearning.calibration_lambdas=[1,x]"), tmp_path)


def test_yaml_booleans_for_on_off_keys_become_on_off(tmp_path):
    cfg = _compose()
    cfg["unlearning"]["repair"] = False  # what `repair: off` in a YAML file gives
    assert build_app_args(cfg, tmp_path).run_config["repair"] == "off"


def test_run_config_file_round_trips(tmp_path):
    rc = build_app_args(_compose("unlearning.alpha=0.5"), tmp_path).run_config
    rc["out-dir"] = str(tmp_path / 'a dir' / 'it\'s "here" \\ ü')
    path = write_run_config(rc, tmp_path / "rc.toml")
    assert tomllib.loads(path.read_text()) == rc


@pytest.mark.parametrize(("derive", "depth", "expected"), [
    ("none", 1, ("none", 1)), ("none", 2, ("finetune", 1)), ("none", 4, ("finetune", 3)),
    ("incremental", 3, ("incremental", 2)), ("transfer", 2, ("transfer", 1)),
])
def test_depth_maps_to_a_chain_of_derived_models(derive, depth, expected):
    assert inheritance(derive, depth) == expected


def test_depth_in_the_composed_config(tmp_path):
    rc = build_app_args(_compose("unlearning.depth=3"), tmp_path).run_config
    assert (rc["derive"], rc["derive-depth"]) == ("finetune", 2)


@pytest.mark.parametrize(("overrides", "message"), [
    (["unlearning.depth=0"], "depth must be >= 1"),
    (["unlearning.derive=finetune"], "depth must be >= 2"),
    (["unlearning.method=sgd"], "unlearning.method='sgd'"),
    (["federation.rounds=2.5"], "federation.rounds must be an integer"),
    (["unlearning.alpha=strong"], "number or 'auto'"),
    (["app_dir=/nonexistent/app"], "app_dir='/nonexistent/app' does not exist"),
    (["+federation.extra_key=1"], r"\['federation.extra_key'\] are not mapped"),
])
def test_bad_config_is_an_error_before_anything_runs(tmp_path, overrides, message):
    with pytest.raises(ConfigError, match=message):
        build_app_args(_compose(*overrides), tmp_path)
    runner = FakeRunner()
    record = run_job(_compose(*overrides), tmp_path / "job", runner=runner)
    assert runner.calls == []
    assert record["status"] == "failed" and record["reason"]
    assert json.loads((tmp_path / "job" / "job.json").read_text())["status"] == "failed"


def test_mapped_key_missing_from_the_app_is_an_error(tmp_path):
    app = tmp_path / "app"
    app.mkdir()
    (app / "pyproject.toml").write_text('[tool.flwr.app.config]\ndataset = "mnist"\n')
    with pytest.raises(ConfigError, match="declares no run-config keys"):
        build_app_args(_compose(f"app_dir={app}"), tmp_path / "job")


# --- one job --------------------------------------------------------------------------------------------


def test_job_that_completes_leaves_its_record_and_plot(tmp_path):
    runner = FakeRunner(results=_results(0.01, 0.9, 2.0))
    record = run_job(_compose("dataset=mnist"), tmp_path / "job", overrides=["dataset=mnist"], runner=runner)
    assert record["status"] == "ok", record["reason"]
    argv = runner.calls[0]
    assert argv[argv.index("--federation-config") + 1] == "num-supernodes=4 client-resources-num-cpus=1"
    assert (tmp_path / "job" / "accuracy.png").stat().st_size > 0
    assert json.loads((tmp_path / "job" / "job.json").read_text())["overrides"] == ["dataset=mnist"]


def test_job_whose_run_fails_records_the_status_and_error(tmp_path):
    record = run_job(_compose(), tmp_path / "job", runner=FakeRunner(status="finished:failed"))
    assert record["status"] == "failed"
    assert "run status finished:failed" in record["reason"] and "ConfigError: bad value" in record["reason"]
    assert (tmp_path / "job" / RUN_LOG).is_file()


@pytest.mark.parametrize(("log_text", "expected"), [
    ("\x1b[91mERROR \x1b[0m: boom\nflwr_run: run status: finished:failed (Simulation failed: Unknown class [42])",
     "run status finished:failed (Simulation failed: Unknown class [42])"),
    ("\x1b[91mERROR \x1b[0m: ValueError: boom\nflwr_run: run status: finished:failed (N/A)",
     "run status finished:failed (N/A); last error: ERROR : ValueError: boom"),
    ("flwr: command not found", "runner exited 2 without a run status"),
])
def test_failure_reason_names_the_status_and_the_cause(log_text, expected):
    assert failure_reason(log_text, 2) == expected


def test_completed_run_without_results_is_a_failure(tmp_path):
    record = run_job(_compose(), tmp_path / "job", runner=FakeRunner(results=None))
    assert record["status"] == "failed" and "no results.json" in record["reason"]


def test_console_script_refuses_an_unknown_key_before_running(tmp_path):
    for override, key in (("federation.num_clientz=3", "num_clientz"), ("+model.depth=3", "model.depth")):
        proc = subprocess.run([str(FL_UNLEARN), override, f"hydra.run.dir={tmp_path / 'run'}"], cwd=tmp_path,
                              capture_output=True, text=True, timeout=60)
        assert proc.returncode != 0
        assert key in proc.stderr + proc.stdout
        assert not (tmp_path / "run" / RUN_LOG).exists()


# --- sweeps ---------------------------------------------------------------------------------------------


def _fake_job(sweep: Path, num: int, record: dict[str, Any] | None, results: dict[str, Any] | None = None) -> None:
    job = sweep / str(num)
    (job / ".hydra").mkdir(parents=True)
    alpha = "auto" if num == 2 else 1.0  # as if conf/unlearning/fiun.yaml had been edited during the sweep
    write_run_config({"seed": 42, "fiun-alpha": alpha, "out-dir": str(job)}, job / "run_config.toml")
    if record is not None:
        (job / "job.json").write_text(json.dumps({"job_dir": str(job), "out_dir": str(job), **record}))
    if results is not None:
        (job / "results.json").write_text(json.dumps(results))


def _settings(clients: int, depth: int) -> dict[str, Any]:
    return {"federation.num_clients": clients, "unlearning.depth": depth, "unlearning.method": "fiun"}


def test_sweep_collector_writes_a_row_per_job_including_failed_ones(tmp_path):
    sweep = tmp_path / "sweep"
    for num, (clients, depth) in enumerate([(2, 1), (2, 2), (4, 1)]):
        results = _results(0.01 * num, 0.9, 2.0 + num)
        if num == 1:  # the App repaired this one's served model
            results["final_global"]["after_repair"] = {"forget_acc": 0.0, "retain_acc": 0.95}
            results["timing"]["repair_s"] = 7.5
            results["targets"] = {"twin_retain_gap": 0.4, "twin_retain_gap_after_repair": 0.01}  # every model's twin
        _fake_job(sweep, num, {"status": "ok", "reason": "", "seconds": 90.0 + num, "settings": _settings(clients, depth),
                               "overrides": [f"federation.num_clients={clients}", f"unlearning.depth={depth}", "seed=1"]},
                  results)
    _fake_job(sweep, 3, {"status": "failed", "reason": "run status finished:failed", "seconds": 12.0,
                         "settings": _settings(4, 2), "overrides": ["federation.num_clients=4", "unlearning.depth=2"]})
    _fake_job(sweep, 10, None)  # crashed before writing job.json
    csv_path, rows = report_sweep(sweep)
    with csv_path.open() as f:
        table = list(csv.DictReader(f))
    assert [r["job"] for r in table] == ["0", "1", "2", "3", "10"]
    assert [r["status"] for r in table] == ["ok", "ok", "ok", "failed", "failed"]
    assert table[3]["reason"] == "run status finished:failed" and table[3]["forget_acc_after"] == ""
    assert "no job.json" in table[4]["reason"]
    assert float(table[2]["forget_acc_after"]) == pytest.approx(0.02)
    assert float(table[2]["max_affected_forget_after"]) == pytest.approx(0.03)
    assert float(table[1]["unlearn_s"]) == 3.0 and float(table[1]["retrain_s"]) == 50.0
    assert (float(table[1]["retain_acc_after_repair"]), float(table[1]["repair_s"])) == (0.95, 7.5)
    assert table[0]["retain_acc_after_repair"] == table[0]["repair_s"] == ""  # not repaired
    assert (float(table[1]["twin_retain_gap_after"]), float(table[1]["twin_retain_gap_after_repair"])) == (0.4, 0.01)
    assert table[0]["twin_retain_gap_after"] == ""  # no retrained twins in that run
    assert table[1]["seed"] == "1" and table[3]["seed"] == ""  # swept keys beyond the settings get columns
    assert (table[0]["federation.num_clients"], table[1]["unlearning.depth"]) == ("2", "2")
    assert [r["run-config.fiun-alpha"] for r in table] == ["1.0", "1.0", "auto", "1.0", ""]
    assert "run-config.seed" not in table[0] and "run-config.out-dir" not in table[0]
    for name in ("sweep_vs_depth.png", "sweep_vs_num_clients.png"):
        assert (sweep / name).stat().st_size > 0


def test_a_sweep_over_methods_plots_one_line_per_method(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    from fl_unlearn.sweep import _PANELS, _plot_panel

    rows = [{"status": "ok", "unlearning.depth": 1, "unlearning.method": method, "forget_acc_after": forget,
             "forget_acc_retrained": 0.0, "unlearn_s": seconds, "retrain_s": 20.0 if method != "retrain" else seconds,
             "twin_retain_gap_after": gap, "twin_retain_gap_after_repair": 0.01 if method == "fiun" else None}
            for method, forget, seconds, gap in [("fiun", 0.0, 1.0, 0.8), ("finetune", 0.9, 5.0, 0.008),
                                                 ("retrain", 0.0, 18.0, None)]]
    fig = plt.figure()
    lines = {}
    for i, (title, _, columns, _) in enumerate(_PANELS):
        ax = fig.add_subplot(1, len(_PANELS), i + 1)
        _plot_panel(ax, rows, "unlearning.depth", columns, None)
        labels = [line.get_label() for line in ax.get_lines()]
        assert len(labels) == len(set(labels)), labels  # method=retrain and the retrained reference: one line
        lines[title] = {line.get_label(): list(line.get_ydata()) for line in ax.get_lines()}
    assert lines["kept data, worst model against its twin"] == {"fiun": [0.8], "finetune": [0.008],
                                                               "fiun, after the repair": [0.01]}
    time_lines = {line.get_label(): list(line.get_ydata()) for line in ax.get_lines()}
    assert time_lines == {"fiun": [1.0], "finetune": [5.0], "retrain": [pytest.approx((20.0 + 20.0 + 18.0 + 18.0) / 4)]}
    plt.close(fig)


def test_sweep_job_count_for_progress_lines():
    assert count_jobs(["federation.num_clients=2,4", "unlearning.depth=1,2", "dataset=mnist"]) == 4
    assert count_jobs(["federation.num_clients=2,4,8"]) == 3


FAKE_RUNNER = """#!/usr/bin/env bash
# Stand-in for scripts/flwr_run.sh: 3 clients fail, others leave a results.json in out-dir.
rc_file=$3; fed=$5
echo "fake flwr run: $fed"
if [[ "$fed" == num-supernodes=3* ]]; then echo "flwr_run: run status: finished:failed"; exit 1; fi
python3 - "$rc_file" <<'EOF'
import json, sys, tomllib
rc = tomllib.load(open(sys.argv[1], "rb"))
final = {"before": {"forget_acc": 0.9, "retain_acc": 0.9}, "after": {"forget_acc": 0.0, "retain_acc": 0.8}}
json.dump({"final_global": final, "timing": {"unlearn_s": 1.0}}, open(rc["out-dir"] + "/results.json", "w"))
EOF
echo "flwr_run: run status: finished:completed"
"""


def test_multirun_goes_on_after_a_failed_job_and_collects_the_table(tmp_path):
    runner = tmp_path / "fake_runner.sh"
    runner.write_text(FAKE_RUNNER)
    sweep = tmp_path / "multirun"
    env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    proc = subprocess.run([str(FL_UNLEARN), "-m", "federation.num_clients=2,3,4", "dataset=digits",
                           f"runner={runner}", f"hydra.sweep.dir={sweep}"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = proc.stdout + proc.stderr
    assert re.search(r"job 2/3 \(federation.num_clients=3 [^)]*\): failed in \d+ s: run status finished:failed", out)
    assert re.search(r"job 3/3 \(federation.num_clients=4 [^)]*\): ok in \d+ s", out)
    with (sweep / "sweep.csv").open() as f:
        table = list(csv.DictReader(f))
    assert [(r["federation.num_clients"], r["status"]) for r in table] == [("2", "ok"), ("3", "failed"), ("4", "ok")]
    assert "finished:failed" in table[1]["reason"]
    assert (sweep / "sweep_vs_num_clients.png").is_file()
