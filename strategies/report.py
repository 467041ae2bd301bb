"""Write a run's results: ``results.json``, the lineage (JSON and PNG) and a short ``report.md``.

Framework-agnostic (no flwr import), so it can move to ``fl_unlearn/report.py`` once that module exists.

Targets checked in ``results.json`` (issue 4, ``reference/flower.md`` §6): forgotten-class held-out accuracy
<= 5 % on the final global model and every affected model (class requests); kept-class accuracy within 5
points of the retrained model's; ``unlearn_s`` < 5 % of ``retrain_s``. With the retrain baseline, every affected
server-held model is also set beside its retrained twin (``twins_retain_ok``: the worst kept gap within 5 points).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

FORGET_ACC_MAX = 0.05
RETAIN_GAP_MAX = 0.05
TIME_RATIO_MAX = 0.05


def _clean(obj: Any) -> Any:
    """JSON-safe copy: NaN/inf become ``None``, tuples lists."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    return obj


def targets(results: dict[str, Any]) -> dict[str, Any]:
    """Which acceptance targets the results meet (``None`` where a figure is missing)."""
    final = results.get("final_global", {})
    after, retrained = final.get("after") or {}, final.get("retrained") or {}
    timing = results.get("timing", {})
    out: dict[str, Any] = {"forget_acc_max": FORGET_ACC_MAX, "retain_gap_max": RETAIN_GAP_MAX,
                           "time_ratio_max": TIME_RATIO_MAX}
    is_class = results.get("request", {}).get("kind") == "classes"
    forgets = [m["after"].get("forget_acc") for m in results.get("affected_models", []) if m.get("after")]
    forgets = [f for f in forgets if f is not None]
    out["final_forget_ok"] = (after.get("forget_acc") is not None and after["forget_acc"] <= FORGET_ACC_MAX) \
        if is_class else None
    out["all_affected_forget_ok"] = (bool(forgets) and max(forgets) <= FORGET_ACC_MAX) if is_class else None
    if after.get("retain_acc") is not None and retrained.get("retain_acc") is not None:
        out["retain_gap"] = retrained["retain_acc"] - after["retain_acc"]  # > 0: below the retrained model
        out["retain_ok"] = abs(out["retain_gap"]) <= RETAIN_GAP_MAX
        out["retain_not_worse_ok"] = out["retain_gap"] <= RETAIN_GAP_MAX
    out.update(_twin_targets(results.get("affected_models", [])))
    if timing.get("retrain_s") and timing.get("unlearn_s") is not None:
        out["time_ratio"] = timing["unlearn_s"] / timing["retrain_s"]
        out["time_ok"] = out["time_ratio"] < TIME_RATIO_MAX
    return out


def twin_gaps_by_stage(models: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Every affected model beside its retrained twin (``retrained``: the same round's model of the federation
    retrained without the data; derived models have none): per stage, per model id, the twin's kept accuracy minus
    the model's (> 0: below the twin).

    The stages: ``before`` unlearning (how far the trained models already were from their twins; a model trained
    without a hard class can be the better one), ``after`` it, and, where the App repaired some model,
    ``after_repair`` (the others as unlearned).
    """
    stages = {"before": lambda m: m.get("before"), "after": lambda m: m.get("after")}
    if any(m.get("after_repair") for m in models):
        stages["after_repair"] = lambda m: m.get("after_repair") or m.get("after")
    out: dict[str, dict[str, float]] = {}
    for label, stage in stages.items():
        gaps = out.setdefault(label, {})
        for m in models:
            twin, own = (m.get("retrained") or {}).get("retain_acc"), (stage(m) or {}).get("retain_acc")
            if twin is not None and own is not None:
                gaps[m["id"]] = twin - own
    return out


#: The suffix of each stage's keys in ``targets``.
_STAGE_KEYS = {"before": "_before", "after": "", "after_repair": "_after_repair"}


def _twin_targets(models: list[dict[str, Any]]) -> dict[str, Any]:
    """The worst kept-accuracy gap to the twins per stage (:func:`twin_gaps_by_stage`), and whether it is within
    ``RETAIN_GAP_MAX``."""
    out: dict[str, Any] = {}
    for stage, gaps in twin_gaps_by_stage(models).items():
        if gaps:
            label, worst = _STAGE_KEYS[stage], max(gaps, key=gaps.__getitem__)
            out.update({f"twins{label}": len(gaps), f"twin_retain_gap{label}": gaps[worst],
                        f"twin_worst_model{label}": worst, f"twins_retain_ok{label}": gaps[worst] <= RETAIN_GAP_MAX})
    return out


def write_results(out_dir: Path, results: dict[str, Any], graph: Any = None, highlight: list[str] = ()) -> Path:
    """Write ``results.json``, ``lineage.json`` / ``lineage.png`` (when ``graph`` is given) and ``report.md``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    results = dict(results, targets=targets(results))
    path = out_dir / "results.json"
    path.write_text(json.dumps(_clean(results), indent=2, sort_keys=True))
    if graph is not None:
        (out_dir / "lineage.json").write_text(graph.to_json())
        graph.render_png(out_dir / "lineage.png", highlight=[h for h in highlight if h in graph])
    (out_dir / "report.md").write_text(render_report(_clean(results)))
    return path


def _pct(value: Any) -> str:
    return "n/a" if value is None else f"{100 * value:.1f} %"


def _auc(value: Any) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def render_report(results: dict[str, Any]) -> str:
    """A short human-readable summary of ``results``."""
    request, final, timing, tg = (results.get(k) or {} for k in ("request", "final_global", "timing", "targets"))
    lines = [
        "# fl_unlearn run",
        "",
        f"- dataset: {results.get('dataset_used')} (asked for {results.get('dataset_requested')}), "
        f"model {results.get('model')}, {results.get('config', {}).get('num-clients')} clients, "
        f"{results.get('config', {}).get('num-server-rounds')} rounds, strategy {results.get('strategy')}",
        f"- request: {request.get('description', request)}; method {results.get('method', 'fiun')}",
        f"- affected models: {len(results.get('affected_models', []))} (roots: {len(results.get('roots', []))})",
        "",
        "| final global model | forget acc | retain acc | MIA AUC (forgotten data) | backdoor ASR |",
        "|---|---|---|---|---|",
    ]
    for label in ("before", "after", "after_repair", "retrained"):
        part = final.get(label)
        if part is None and label == "after_repair":
            continue
        part = part or {}
        lines.append(f"| {label.replace('_', ' ')} | {_pct(part.get('forget_acc'))} | {_pct(part.get('retain_acc'))} | "
                     f"{_auc(part.get('mia_auc'))} | {_pct(part.get('backdoor_asr'))} |")
    lines += ["", "| model | kind | forget before | forget after | retain before | retain after | after repair "
              "(forget / retain) | retrained twin (forget / retain) | MIA AUC (before / after) | "
              "backdoor ASR (before / after) |", "|---|---|---|---|---|---|---|---|---|---|"]
    for m in results.get("affected_models", []):
        b, a, r, t = m.get("before") or {}, m.get("after") or {}, m.get("after_repair"), m.get("retrained")
        repaired = "-" if r is None else f"{_pct(r.get('forget_acc'))} / {_pct(r.get('retain_acc'))}"
        twin = "-" if t is None else f"{_pct(t.get('forget_acc'))} / {_pct(t.get('retain_acc'))}"
        lines.append(f"| {m['id']} | {m['kind']} | {_pct(b.get('forget_acc'))} | {_pct(a.get('forget_acc'))} | "
                     f"{_pct(b.get('retain_acc'))} | {_pct(a.get('retain_acc'))} | {repaired} | {twin} | "
                     f"{_auc(b.get('mia_auc'))} / {_auc(a.get('mia_auc'))} | "
                     f"{_pct(b.get('backdoor_asr'))} / {_pct(a.get('backdoor_asr'))} |")
    ratio = tg.get("time_ratio")
    lines += [
        "",
        f"- timing: train {timing.get('train_s', 0):.1f} s, unlearn {timing.get('unlearn_s', 0):.2f} s, "
        f"retrain {timing.get('retrain_s') or 0:.1f} s"
        + (f" (unlearn/retrain = {100 * ratio:.2f} %)" if ratio is not None else "")
        + (f"; repair {timing['repair_s']:.2f} s, apart" if timing.get("repair_s") else ""),
        f"- targets: final forget <= 5 %: {tg.get('final_forget_ok')}, every affected model: "
        f"{tg.get('all_affected_forget_ok')}, retain within 5 points of retrained: {tg.get('retain_ok')}, "
        f"time < 5 %: {tg.get('time_ok')}",
    ]
    if tg.get("twins"):
        lines.append(f"- every model within 5 points of its retrained twin ({tg['twins']} twins): "
                     f"{tg['twins_retain_ok']} (worst {tg['twin_worst_model']}, {100 * tg['twin_retain_gap']:.1f} "
                     "points below)" + (f"; after the repair: {tg['twins_retain_ok_after_repair']} (worst "
                                        f"{tg['twin_worst_model_after_repair']}, "
                                        f"{100 * tg['twin_retain_gap_after_repair']:.1f} points)"
                                        if "twins_after_repair" in tg else "")
                     + (f"; before unlearning: worst {tg['twin_worst_model_before']}, "
                        f"{100 * tg['twin_retain_gap_before']:.1f} points" if "twins_before" in tg else ""))
    budget = results.get("repair_budget") or {}
    cut = ([f"rounds ended early for {', '.join(budget['stopped'])}"] if budget.get("stopped") else []) \
        + ([f"not repaired: {', '.join(budget['skipped'])}"] if budget.get("skipped") else [])
    if cut:
        lines.append(f"- repair budget spent ({budget.get('seconds') or 0:.1f} s, {budget.get('fraction')} of the "
                     "training run's time): " + "; ".join(cut))
    erasure = results.get("erasure") or {}
    if erasure.get("skipped"):
        lines.append(f"- superseded models not erased: {erasure['skipped']}")
    elif erasure:
        fishers = erasure["server_objects"] - erasure["server_models"]
        lines.append(f"- erased: the weights of {erasure['server_models']} replaced server-held and "
                     f"{erasure['client_files']} client-held models"
                     + (f", {fishers} Fishers of the forgotten data" if fishers > 0 else "")
                     + f" ({erasure['bytes_freed'] / 2**20:.1f} MiB)"
                     + (f"; clients {', '.join(sorted(erasure['failures']))} did not answer and keep theirs"
                        if erasure.get("failures") else ""))
    if results.get("warnings"):
        lines += ["", "## Warnings", ""] + [f"- {w}" for w in results["warnings"]]
    return "\n".join(lines) + "\n"
