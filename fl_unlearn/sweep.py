"""Sweeps of ``fl-unlearn -m``: a progress line per job, then ``sweep.csv`` and plots in the sweep directory.

:class:`SweepCallback` is configured under ``hydra.callbacks`` in ``conf/config.yaml``. Each job of a sweep
leaves a ``job.json`` (written by :func:`fl_unlearn.cli.run_job`, also for a failed job) and, when it
succeeded, the App's ``results.json``. At the end of the sweep :func:`collect_sweep` reads them into one row
per job, failed jobs included with their reason, and :func:`write_sweep_csv` / :func:`plot_sweep` write the
table and the plots (forgotten / kept accuracy and unlearning time against depth and against the number of
clients, one line per method). Plain functions on plain dicts and directories: testable without Hydra runs.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import tomllib
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from fl_unlearn.cli import JOB_RECORD, RUN_CONFIG_FILE

log = logging.getLogger(__name__)

#: Run-config keys that differ between any two jobs anyway (not worth a column).
_PER_JOB_KEYS = ("out-dir", "store-dir")
#: Settings every row carries (the axes of the plots), whether swept or not.
SETTING_COLUMNS = ("dataset.name", "federation.num_clients", "federation.rounds", "unlearning.depth",
                   "unlearning.method", "request.kind")
#: Figures read from results.json: the final global model before / after unlearning and retrained, the worst kept-
#: accuracy gap of an affected model to its retrained twin (points as a fraction; > 0: below it), timings.
FIGURE_COLUMNS = ("forget_acc_before", "forget_acc_after", "forget_acc_retrained", "retain_acc_before",
                  "retain_acc_after", "retain_acc_retrained", "forget_acc_after_repair", "retain_acc_after_repair",
                  "mia_auc_before", "mia_auc_after", "mia_auc_retrained", "backdoor_asr_before", "backdoor_asr_after",
                  "backdoor_asr_retrained", "max_affected_forget_after", "twin_retain_gap_after",
                  "twin_retain_gap_after_repair", "affected_models", "unlearn_s", "repair_s", "retrain_s", "train_s")
STATUS_COLUMNS = ("job", "status", "reason", "seconds")
#: x axes of the sweep plots: (column, file name stem, label).
PLOT_AXES = (("unlearning.depth", "sweep_vs_depth", "inheritance depth"),
             ("federation.num_clients", "sweep_vs_num_clients", "number of clients"))


def figures(results: Mapping[str, Any]) -> dict[str, Any]:
    """The sweep table's figures of one run's ``results.json`` (``None`` where a figure is missing)."""
    final = results.get("final_global") or {}
    timing = results.get("timing") or {}
    out: dict[str, Any] = {}
    for stage in ("before", "after", "retrained", "after_repair"):  # after_repair: only where the App repaired
        part = final.get(stage) or {}
        out[f"forget_acc_{stage}"] = part.get("forget_acc")
        out[f"retain_acc_{stage}"] = part.get("retain_acc")
        if stage != "after_repair":  # membership inference and the backdoor, where the run measured them
            out[f"mia_auc_{stage}"] = part.get("mia_auc")
            out[f"backdoor_asr_{stage}"] = part.get("backdoor_asr")
    models = results.get("affected_models") or []
    afters = [(m.get("after") or {}).get("forget_acc") for m in models]
    afters = [a for a in afters if a is not None]
    out["max_affected_forget_after"] = max(afters) if afters else None
    targets = results.get("targets") or {}
    out["twin_retain_gap_after"] = targets.get("twin_retain_gap")
    out["twin_retain_gap_after_repair"] = targets.get("twin_retain_gap_after_repair")
    out["affected_models"] = len(models)
    for key in ("unlearn_s", "repair_s", "retrain_s", "train_s"):
        out[key] = timing.get(key)
    return out


def _job_number(job_dir: Path) -> int | str:
    return int(job_dir.name) if job_dir.name.isdigit() else job_dir.name


def job_row(job_dir: Path) -> dict[str, Any]:
    """One row of the sweep table from a job directory (a job that left no ``job.json`` is a failed row)."""
    row: dict[str, Any] = {"job": _job_number(job_dir)}
    record_path = job_dir / JOB_RECORD
    if not record_path.is_file():
        return {**row, "status": "failed", "reason": f"no {JOB_RECORD}: the job ended before recording itself "
                f"(see {job_dir}/*.log)", "overrides": {}, "run_config": {}}
    record = json.loads(record_path.read_text())
    row.update(status=record.get("status", "failed"), reason=record.get("reason", ""),
               seconds=record.get("seconds"), overrides=_parse_overrides(record.get("overrides", [])))
    row.update(record.get("settings") or {})
    run_config_path = job_dir / RUN_CONFIG_FILE
    row["run_config"] = tomllib.loads(run_config_path.read_text()) if run_config_path.is_file() else {}
    results_path = Path(record.get("out_dir") or job_dir) / "results.json"
    if row["status"] == "ok":
        if results_path.is_file():
            row.update(figures(json.loads(results_path.read_text())))
        else:
            row.update(status="failed", reason=f"results.json missing from {results_path.parent}")
    return row


def _parse_overrides(overrides: Iterable[str]) -> dict[str, str]:
    """``["a.b=2", "c=x"]`` -> ``{"a.b": "2", "c": "x"}`` (swept values as typed on the command line)."""
    out = {}
    for item in overrides:
        key, _, value = str(item).partition("=")
        out[key.lstrip("+~")] = value
    return out


def job_dirs(sweep_dir: Path) -> list[Path]:
    """Job directories of a sweep: sub-directories with a Hydra record (``.hydra``) or a ``job.json``."""
    dirs = [d for d in Path(sweep_dir).iterdir() if d.is_dir() and ((d / ".hydra").is_dir() or (d / JOB_RECORD).is_file())]
    return sorted(dirs, key=lambda d: (0, int(d.name), "") if d.name.isdigit() else (1, 0, d.name))


def collect_sweep(sweep_dir: Path) -> list[dict[str, Any]]:
    """One row per job of ``sweep_dir``: swept values, status, reason, settings and figures.

    Run-config values that differ between jobs get a ``run-config.<key>`` column too: they show what the
    App was given (e.g. ``derive-depth`` for ``unlearning.depth``), and a conf file edited while a sweep
    ran (Hydra composes each job when it starts) shows up there instead of passing unnoticed.
    """
    rows = [job_row(d) for d in job_dirs(sweep_dir)]
    swept = sorted({k for r in rows for k in r["overrides"]} - set(SETTING_COLUMNS))
    configs = [r["run_config"] for r in rows if r["run_config"]]
    varying = sorted(k for k in {k for c in configs for k in c} - set(_PER_JOB_KEYS)
                     if len({json.dumps(c.get(k)) for c in configs}) > 1)
    for row in rows:
        overrides, run_config = row.pop("overrides"), row.pop("run_config")
        row.update({key: overrides.get(key) for key in swept})
        row.update({f"run-config.{key}": run_config.get(key) for key in varying})
    return rows


def sweep_columns(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """Column order: swept keys, status, settings, figures, then anything else."""
    fixed = [*STATUS_COLUMNS, *SETTING_COLUMNS, *FIGURE_COLUMNS]
    extra = sorted({k for r in rows for k in r} - set(fixed))
    return extra + fixed


def write_sweep_csv(rows: Sequence[Mapping[str, Any]], path: Path) -> Path:
    """``sweep.csv``: one row per job (empty cells where a figure is missing, e.g. a failed job)."""
    columns = sweep_columns(rows)
    with Path(path).open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: ("" if row.get(k) is None else row.get(k)) for k in columns})
    return Path(path)


# --------------------------------------------------------------------------------------------------------
# plots (matplotlib's Agg canvas directly: no pyplot state, no display)
# --------------------------------------------------------------------------------------------------------


def _figure(width: float, height: float) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: PLC0415
    from matplotlib.figure import Figure  # noqa: PLC0415

    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def plot_job_accuracy(results: Mapping[str, Any], path: Path) -> Path:
    """``accuracy.png`` of one run: forgotten / kept accuracy of the final global model, before, after, retrained."""
    fig_values = figures(results)
    stages = [s for s in ("before", "after", "retrained")
              if fig_values[f"forget_acc_{s}"] is not None or fig_values[f"retain_acc_{s}"] is not None]
    fig = _figure(5.5, 3.5)
    ax = fig.add_subplot()
    width = 0.38
    for offset, (part, label) in zip((-width / 2, width / 2), (("forget", "forgotten"), ("retain", "kept"))):
        values = [fig_values[f"{part}_acc_{s}"] for s in stages]
        bars = ax.bar([i + offset for i in range(len(stages))], [math.nan if v is None else v for v in values],
                      width, label=label)
        ax.bar_label(bars, labels=["" if v is None else f"{100 * v:.1f}%" for v in values], fontsize=8)
    ax.set_xticks(range(len(stages)), stages)
    ax.set_ylim(0, 1.1)
    ax.set_ylabel("held-out accuracy")
    ax.set_title("final global model")
    fig.legend(loc="outside lower center", ncol=2)
    fig.savefig(path, dpi=110)
    return Path(path)


def _number(value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


#: (panel title, y label, [(series label, column)], "log" or the y limits); ``{method}`` is the row's
#: unlearning.method. The final global model's figures, the worst forgotten accuracy over all affected models
#: (derived too), and the largest kept-accuracy gap of an affected server-held model to its retrained twin.
_PANELS = (
    ("forgotten data", "held-out accuracy", [("original", "forget_acc_before"), ("{method}", "forget_acc_after"),
                                             ("{method}, worst affected model", "max_affected_forget_after"),
                                             ("retrain", "forget_acc_retrained")], (-0.02, 1.02)),
    ("kept data", "held-out accuracy", [("original", "retain_acc_before"), ("{method}", "retain_acc_after"),
                                        ("retrain", "retain_acc_retrained")], (-0.02, 1.02)),
    ("kept data, worst model against its twin", "held-out accuracy below the retrained twin",
     [("{method}", "twin_retain_gap_after"), ("{method}, after the repair", "twin_retain_gap_after_repair")],
     (-0.1, 1.02)),
    ("time", "seconds", [("{method}", "unlearn_s"), ("retrain", "retrain_s")], "log"),
)


def _series(rows: Sequence[Mapping[str, Any]], x_key: str, column: str, label: str,
            group_key: str | None) -> dict[tuple[str, str | None], dict[float, list[float]]]:
    """The values per x of each line ``(method, value of the other axis or None)``; a point is their mean, so
    jobs that differ only in a third swept key (e.g. seeds) share one."""
    values: dict[tuple[str, str | None], dict[float, list[float]]] = {}
    for row in rows:
        x, y = _number(row.get(x_key)), _number(row.get(column))
        if math.isnan(x) or math.isnan(y):
            continue
        line = (label.format(method=row.get("unlearning.method") or "fiun"),
                None if group_key is None else str(row.get(group_key)))
        values.setdefault(line, {}).setdefault(x, []).append(y)
    return values


_LINE_STYLES = ("-", "--", ":", "-.")
_FIXED_COLOURS = {"original": "C7", "retrain": "C2"}


def _colour(method: str) -> str:
    """The same colour for a method in every panel: grey original, green retrain, others from the cycle."""
    others = ("C0", "C1", "C3", "C4", "C5", "C6", "C8", "C9")
    base = method.split(",")[0]  # "fiun, worst affected model" shares fiun's colour (and gets markers "x")
    return _FIXED_COLOURS.get(base) or others[sum(map(ord, base)) % len(others)]


def _plot_panel(ax: Any, rows: Sequence[Mapping[str, Any]], x_key: str, columns: Sequence[tuple[str, str]],
                group_key: str | None) -> None:
    """One colour per method, one line style per value of the other axis. Series that get the same line (the
    retrained reference and ``unlearning.method=retrain``'s own figures) are one line: the mean of their values."""
    groups = sorted({str(r.get(group_key)) for r in rows}, key=_number) if group_key else [None]
    lines: dict[tuple[str, str | None], dict[float, list[float]]] = {}
    for label, column in columns:
        for line, by_x in _series(rows, x_key, column, label, group_key).items():
            for x, ys in by_x.items():
                lines.setdefault(line, {}).setdefault(x, []).extend(ys)
    for (method, group), by_x in lines.items():
        points = sorted((x, sum(ys) / len(ys)) for x, ys in by_x.items())
        name = method if group is None else f"{method} ({group_key.split('.')[-1]}={group})"
        ax.plot(*zip(*points), marker="x" if "," in method else "o", color=_colour(method), label=name,
                linestyle=_LINE_STYLES[groups.index(group) % len(_LINE_STYLES)])


def plot_sweep(rows: Sequence[Mapping[str, Any]], out_dir: Path) -> list[Path]:
    """Plots against depth and against the number of clients (jobs that failed are left out)."""
    ok = [r for r in rows if r.get("status") == "ok"]
    paths = []
    for x_key, stem, x_label in PLOT_AXES:
        other = next(k for k, _, _ in PLOT_AXES if k != x_key)
        group = other if len({str(r.get(other)) for r in ok}) > 1 else None
        fig = _figure(20, 5.6)
        for i, (title, y_label, columns, scale) in enumerate(_PANELS):
            ax = fig.add_subplot(1, len(_PANELS), i + 1)
            _plot_panel(ax, ok, x_key, columns, group)
            ax.set_title(title)
            ax.set_xlabel(x_label)
            ax.set_ylabel(y_label)
            ticks = sorted({x for x in (_number(r.get(x_key)) for r in ok) if not math.isnan(x)})
            if ticks:
                ax.set_xticks(ticks)
            if scale == "log":
                if ax.lines:
                    ax.set_yscale("log")
            else:
                ax.set_ylim(*scale)
            if ax.lines:  # below the panel: lines near 0 and 1 stay visible
                ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.15), ncol=2)
        path = Path(out_dir) / f"{stem}.png"
        fig.savefig(path, dpi=110)
        paths.append(path)
    return paths


def report_sweep(sweep_dir: Path) -> tuple[Path, list[dict[str, Any]]]:
    """Collect a finished sweep and write ``sweep.csv`` and the plots into ``sweep_dir``."""
    rows = collect_sweep(sweep_dir)
    csv_path = write_sweep_csv(rows, Path(sweep_dir) / "sweep.csv")
    plot_sweep(rows, Path(sweep_dir))
    return csv_path, rows


# --------------------------------------------------------------------------------------------------------
# Hydra callback
# --------------------------------------------------------------------------------------------------------


def count_jobs(overrides: Sequence[str]) -> int | None:
    """Number of jobs the basic sweeper makes of ``overrides`` (the product of the sweeps' lengths)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser  # noqa: PLC0415

    try:
        parsed = OverridesParser.create().parse_overrides(list(overrides))
        return math.prod(len(list(o.sweep_string_iterator())) for o in parsed if o.is_sweep_override())
    except Exception:  # noqa: BLE001  (glob sweeps need the config loader; the count is only for progress)
        return None


class SweepCallback(Callback):
    """Progress line per job ("job 2/4 ... ok in 95 s"); ``sweep.csv`` and plots when the sweep ends."""

    def __init__(self) -> None:
        self.total: int | None = None

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self.total = count_jobs(list(config.hydra.overrides.task))
        log.info("sweep: %s jobs into %s", self.total or "?", Path(config.hydra.sweep.dir).resolve())

    def _label(self, config: DictConfig) -> str:
        return f"job {int(config.hydra.job.num) + 1}/{self.total or '?'}"

    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        if self.total is not None:
            log.info("%s started: %s", self._label(config), " ".join(config.hydra.overrides.task))

    def on_job_end(self, config: DictConfig, job_return: Any, **kwargs: Any) -> None:
        if self.total is None:
            return
        from hydra.core.utils import JobStatus  # noqa: PLC0415

        completed = job_return.status == JobStatus.COMPLETED and isinstance(job_return.return_value, dict)
        record = job_return.return_value if completed else {"reason": "the job raised (see its log)"}
        status = record.get("status", "failed")
        log.log(logging.INFO if status == "ok" else logging.WARNING, "%s (%s): %s in %.0f s%s", self._label(config),
                " ".join(config.hydra.overrides.task), status, float(record.get("seconds") or 0),
                f": {record['reason']}" if record.get("reason") else "")

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir).resolve()
        csv_path, rows = report_sweep(sweep_dir)
        failed = sum(r["status"] != "ok" for r in rows)
        log.info("sweep: %d jobs, %d ok, %d failed; %s and plots in %s", len(rows), len(rows) - failed, failed,
                 csv_path.name, sweep_dir)
