"""Hybrid exact/approximate unlearning on a SISA federation: policies compared, and the planner's estimate.

MNIST, 4 clients, S=4 shards, R=4 slices (defaults). The federation is trained once; each policy then
unlearns the same sequence of requests on its own copy (store and lineage copied, then restored):

- ``auto`` (HS): the planner's choice per shard, budget ``--budget`` (default 0.6 of a shard's full cost);
- ``exact`` (SISA): always roll back and rerun from ``min(r*, d_s)``;
- ``auto+ohs`` (OHS): the same decisions, with OHS calibration rounds after every FIUn;
- ``approximate``: always FIUn with alpha="auto";
- ``scratch``: the gold standard, a federation trained from scratch without the revoked samples (same seed).

The revoked samples (``--revoked``, default 20) are spread evenly over slices, clients and shards, and arrive
as ``--requests`` requests (default: one sample each) in a seeded random order (``--order late-first``:
samples of later slices first, so ``auto`` meets clean shards with cheap exact reruns before pitfall P1 makes
them dirty). For every policy the table
gives unlearning time, held-out accuracy of the ensemble (on test data not used for calibration), accuracy
on the revoked samples, and the loss-threshold membership-inference AUC on the revoked samples against 20x
as many class-matched held-out samples (bootstrap standard error in brackets). The exact policy's models
are also checked ``torch.equal`` to scratch.

A second table compares the planner's estimated exact-path seconds with the measured ones, per start stage
``r0``, over the exact policy's reruns (and the auto policy's exact ones).

    python benchmarks/hybrid.py --out /tmp/hybrid.json
    python benchmarks/hybrid.py --max-train 12000 --revoked 8     # a quick look
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from sklearn.metrics import roc_auc_score

from fl_unlearn.data import DataConfig, load_federated, make_loader, sample_ids
from fl_unlearn.evaluate import accuracy, per_sample_loss
from fl_unlearn.hybrid import ApproxConfig, HybridUnlearner
from fl_unlearn.lineage import LineageGraph
from fl_unlearn.sisa import SisaConfig, SisaFederation
from fl_unlearn.store import Store

#: Table rows: name -> (hybrid-policy, ohs).
POLICIES = {"auto": ("auto", False), "auto+ohs": ("auto", True), "exact": ("exact", False),
            "approximate": ("approximate", False)}


# -- set-up -------------------------------------------------------------------------------------------


def split_test(data, val_size: int, seed: int):
    """Validation (calibration, OHS) and held-out evaluation halves of the test split, disjoint."""
    perm = np.random.default_rng(seed).permutation(len(data.test))
    return data.test.select(np.sort(perm[:val_size])), data.test.select(np.sort(perm[val_size:]))


def pick_revoked(fed: SisaFederation, n: int, seed: int) -> list[tuple[int, int]]:
    """``n`` (client, id) pairs spread evenly over slices, and round-robin over clients and shards."""
    rng = np.random.default_rng(seed)
    K, S, R = len(fed.clients), fed.num_shards, fed.num_slices
    out = []
    for i in range(n):
        slc, client, shard = 1 + i % R, (i // R) % K, (i + i // R) % S
        ids = sample_ids(fed.data.partition(client))
        shards, slices = fed.layout.assign(ids)
        candidates = ids[(shards == shard) & (slices == slc)]
        out.append((client, int(rng.choice(candidates))))
    return out


def make_requests(fed: SisaFederation, revoked: list[tuple[int, int]], num_requests: int, order_by: str,
                  seed: int) -> list[dict[int, list[int]]]:
    """Group the samples into requests, in a seeded random order or latest slice first (``late-first``)."""
    order = np.random.default_rng(seed + 1).permutation(len(revoked))
    if order_by == "late-first":
        slices = np.array([fed.layout.assign([i])[1][0] for _, i in revoked])
        order = order[np.argsort(-slices[order], kind="stable")]
    requests = []
    for chunk in np.array_split(order, num_requests):
        req: dict[int, list[int]] = {}
        for j in chunk.tolist():
            req.setdefault(revoked[j][0], []).append(revoked[j][1])
        requests.append(req)
    return requests


def member_sets(data, heldout, revoked: list[tuple[int, int]], ratio: int, seed: int):
    """Members (the revoked samples) and ``ratio`` x as many class-matched held-out non-members."""
    ids = [i for _, i in revoked]
    members = data.train.select(np.flatnonzero(np.isin(sample_ids(data.train), ids)))
    member_labels = make_loader(members, len(members)).dataset.labels.numpy()
    labels = make_loader(heldout, len(heldout)).dataset.labels.numpy()
    rng = np.random.default_rng(seed + 2)
    rows = [rng.choice(np.flatnonzero(labels == c), ratio, replace=False) for c in member_labels]
    return members, heldout.select(np.sort(np.concatenate(rows)))


# -- metrics ------------------------------------------------------------------------------------------


def mia(model, members, nonmembers, reps: int = 500, seed: int = 0) -> tuple[float, float]:
    """Loss-threshold MIA AUC and its bootstrap standard error (members and non-members resampled)."""
    lm, ln = per_sample_loss(model, members), per_sample_loss(model, nonmembers)
    auc = _auc(lm, ln)
    rng = np.random.default_rng(seed)
    boots = [_auc(rng.choice(lm, len(lm)), rng.choice(ln, len(ln))) for _ in range(reps)]
    return auc, float(np.std(boots))


def _auc(members: np.ndarray, nonmembers: np.ndarray) -> float:
    y = np.concatenate([np.ones(len(members)), np.zeros(len(nonmembers))])
    return float(roc_auc_score(y, -np.concatenate([members, nonmembers])))


def metrics(fed: SisaFederation, heldout, members, nonmembers) -> dict[str, float]:
    model = fed.ensemble()
    auc, se = mia(model, members, nonmembers)
    return {"heldout_acc": accuracy(model, make_loader(heldout, 512)),
            "revoked_acc": accuracy(model, make_loader(members, 512)), "mia_auc": auc, "mia_se": se}


# -- runs ---------------------------------------------------------------------------------------------


def copy_federation(data, cfg: SisaConfig, root: Path, name: str) -> SisaFederation:
    shutil.copytree(root / "base", root / name)
    return SisaFederation.restore(data, cfg, Store(root / name / "store"), LineageGraph.load(root / name / "lineage"))


def run_policy(name: str, fed: SisaFederation, validation, requests, args) -> dict:
    policy, ohs = POLICIES[name]
    hybrid = HybridUnlearner(fed, validation, budget_fraction=args.budget, policy=policy,
                             approx=ApproxConfig(ohs=ohs, ohs_stop=args.ohs_stop, ohs_fraction=args.ohs_fraction,
                                                 ohs_max_rounds=args.ohs_max_rounds))
    rows, start = [], time.perf_counter()
    for i, req in enumerate(requests):
        report = hybrid.unlearn(req)
        rows.append(request_row(i, report))
        logging.getLogger("hybrid-bench").info("%s request %d: %s, %.2f s", name, i, report.path, report.seconds)
    return {"seconds": time.perf_counter() - start, "requests": rows}


def request_row(i: int, report) -> dict:
    measured = report.exact.shards if report.exact else {}
    shards = []
    for sp in report.plan.shards:
        rerun = measured.get(sp.shard)
        shards.append({"shard": sp.shard, "r_star": sp.r_star, "start_stage": sp.start_stage, "path": sp.path,
                       "exact_evaluations": sp.exact_evaluations, "exact_seconds_est": sp.exact_seconds,
                       "exact_seconds": rerun.seconds if rerun else None,
                       "evaluations": rerun.evaluations if rerun else None})
    return {"request": i, "path": report.path, "seconds": report.seconds, "shards": shards,
            "approximate": {str(s): {k: v for k, v in a.items() if k != "ohs_val_loss"}
                            for s, a in report.approximate.items()}}


def bitwise_equal(a: SisaFederation, b: SisaFederation) -> bool:
    for s in range(a.num_shards):
        wa, wb = a.shard_weights(s), b.shard_weights(s)
        if not all(torch.equal(wa[k], wb[k]) for k in wa):
            return False
    return True


# -- tables -------------------------------------------------------------------------------------------


def print_policies(results: dict) -> None:
    print(f"\n{'policy':<13}{'time s':>9}{'speed-up':>10}{'paths (e/a)':>13}{'held-out acc':>14}"
          f"{'revoked acc':>13}{'MIA AUC':>16}")
    exact_s = results["exact"]["seconds"]
    for name in ("original", *POLICIES, "scratch"):
        r = results[name]
        m = r["metrics"]
        paths = [sh["path"] for q in r.get("requests", []) for sh in q["shards"]]
        counts = f"{paths.count('exact')}/{paths.count('approximate')}" if paths else "-"
        t = r.get("seconds")
        time_s = f"{t:9.1f}" if t is not None else f"{'-':>9}"
        speed = f"{exact_s / t:9.2f}x" if t else f"{'-':>10}"
        print(f"{name:<13}{time_s}{speed}{counts:>13}{m['heldout_acc']:>14.4f}{m['revoked_acc']:>13.3f}"
              f"{m['mia_auc']:>9.3f} ({m['mia_se']:.3f})")


def print_estimates(results: dict) -> dict:
    pairs = [(sh["start_stage"], sh["exact_seconds_est"], sh["exact_seconds"])
             for name in POLICIES for q in results[name]["requests"] for sh in q["shards"]
             if sh["exact_seconds"] is not None]
    print(f"\n{'r0':>4}{'reruns':>8}{'estimated s':>13}{'measured s':>12}{'ratio est/meas':>16}{'worst':>8}")
    table = {}
    for r0 in sorted({p[0] for p in pairs}):
        est = np.array([p[1] for p in pairs if p[0] == r0])
        meas = np.array([p[2] for p in pairs if p[0] == r0])
        ratios = est / meas
        worst = float(ratios[np.argmax(np.abs(ratios - 1))])
        table[r0] = {"n": len(est), "estimated": float(est.mean()), "measured": float(meas.mean()),
                     "ratio": float(est.sum() / meas.sum()), "worst": worst}
        print(f"{r0:>4}{len(est):>8}{est.mean():>13.2f}{meas.mean():>12.2f}{table[r0]['ratio']:>16.3f}{worst:>8.3f}")
    return table


# -- main ---------------------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> dict:
    data = load_federated(DataConfig(source="mnist", num_partitions=args.clients, partitioner="iid",
                                     seed=args.seed, max_train=args.max_train))
    validation, heldout = split_test(data, args.val_size, args.seed)
    cfg = SisaConfig(num_shards=args.shards, num_slices=args.slices, rounds_per_stage=args.rounds_per_stage,
                     local_epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, seed=args.seed)
    root = Path(tempfile.mkdtemp(prefix="hybrid-bench-"))
    try:
        return _run(args, data, validation, heldout, cfg, root)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _run(args, data, validation, heldout, cfg, root: Path) -> dict:
    base = SisaFederation(data, cfg, Store(root / "base" / "store"), LineageGraph(root / "base" / "lineage"))
    train = base.train()
    revoked = pick_revoked(base, args.revoked, args.seed)
    requests = make_requests(base, revoked, args.requests, args.order, args.seed)
    members, nonmembers = member_sets(data, heldout, revoked, args.nonmember_ratio, args.seed)
    results = {"config": vars(args), "train": train, "revoked": revoked, "requests_sent": requests,
               "original": {"metrics": metrics(base, heldout, members, nonmembers)}}
    print(f"trained in {train['seconds']:.1f} s ({train['evaluations']:.0f} sample-gradients); "
          f"{len(revoked)} revoked samples in {len(requests)} requests")
    for policy in POLICIES:
        fed = copy_federation(data, cfg, root, policy)
        results[policy] = run_policy(policy, fed, validation, requests, args)
        results[policy]["metrics"] = metrics(fed, heldout, members, nonmembers)
        if policy == "exact":
            exact_fed = fed
    t0 = time.perf_counter()
    exclude: dict[int, list[int]] = {}
    for k, i in revoked:
        exclude.setdefault(k, []).append(i)
    gold = SisaFederation(data, cfg, Store(root / "gold"), exclude=exclude)
    gold.train()
    results["scratch"] = {"seconds": time.perf_counter() - t0, "metrics": metrics(gold, heldout, members, nonmembers)}
    results["exact_equals_scratch"] = bitwise_equal(exact_fed, gold)
    print_policies(results)
    print(f"\nexact policy's shard-models torch.equal to scratch: {results['exact_equals_scratch']}")
    results["estimates"] = print_estimates(results)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-train", type=int, default=None, help="subsample MNIST's training split")
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("--slices", type=int, default=4)
    parser.add_argument("--rounds-per-stage", type=int, default=1)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--revoked", type=int, default=20)
    parser.add_argument("--requests", type=int, default=None, help="requests the samples arrive in (default: one each)")
    parser.add_argument("--budget", type=float, default=0.6)
    parser.add_argument("--order", default="random", choices=["random", "late-first"],
                        help="request order: seeded random, or samples of later slices first")
    parser.add_argument("--ohs-stop", default="restore", choices=["stall", "restore"],
                        help="OHS stopping rule (fl_unlearn.hybrid.ApproxConfig.ohs_stop)")
    parser.add_argument("--ohs-fraction", type=float, default=0.1, help="share of an epoch per OHS round")
    parser.add_argument("--ohs-max-rounds", type=int, default=None,
                        help="cap on OHS rounds (default: fl_unlearn.hybrid.ohs_round_cap)")
    parser.add_argument("--val-size", type=int, default=2000, help="test rows used for calibration, not evaluation")
    parser.add_argument("--nonmember-ratio", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    args = parser.parse_args()
    args.requests = args.requests or args.revoked
    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    for name in ("fl_unlearn.fisher", "fl_unlearn.fiun", "fl_unlearn.calibrate", "fl_unlearn.sisa"):
        logging.getLogger(name).setLevel(logging.WARNING)
    results = run(args)
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2, default=str))


if __name__ == "__main__":
    main()
