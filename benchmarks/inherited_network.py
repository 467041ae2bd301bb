"""Worked example: unlearn classes from inherited model networks without Flower, on real data.

Three networks, as in the paper's experiments, each unlearned in one call (all affected models at once):
- chain: a root holding every class, then three generations fine-tuned one after another;
- star: a root with three children, the first growing a chain to depth 3;
- multi-root: two roots that each hold one class to forget, a child averaging them, and its child.

For every affected model it prints held-out accuracy on the forgotten classes and on the rest before and
after unlearning, next to the same node retrained from scratch without the forgotten classes (same seeds),
and the time of unlearning against the time of retraining the affected models.

    python benchmarks/inherited_network.py --dataset mnist --out /tmp/inherited.json
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile

import torch

from fl_unlearn.data import DataConfig, load_federated
from fl_unlearn.fiun import FIUnConfig
from fl_unlearn.inherited import (
    InheritedNetwork,
    TrainSettings,
    chain_network,
    multi_root_network,
    run_experiment,
    star_network,
)
from fl_unlearn.requests import UnlearningRequest
from fl_unlearn.store import Store


def networks(forget: int, second: int) -> dict[str, tuple[list, list[int]]]:
    return {
        "chain": (chain_network(3, [forget]), [forget]),
        "star": (star_network(3, [forget], depth=3), [forget]),
        "multi-root": (multi_root_network(forget, second), [forget, second]),
    }


def run(args: argparse.Namespace) -> dict:
    results = {}
    for name, (specs, forget) in networks(args.forget, args.second).items():
        data = load_federated(DataConfig(source=args.dataset, num_partitions=len(specs), partitioner="iid",
                                         seed=args.seed, max_train=args.max_train))
        settings = TrainSettings(model="cnn", epochs=args.epochs, seed=args.seed)
        with tempfile.TemporaryDirectory() as tmp:
            net = InheritedNetwork(specs, data, settings, Store(tmp))
            results[name] = run_experiment(net, UnlearningRequest.for_classes(forget), FIUnConfig(),
                                           alpha=args.alpha, fisher_layers=args.fisher_layers,
                                           estimator=args.estimator, mfim_mode=args.mfim_mode,
                                           fisher_samples=args.fisher_samples or None)
        print_network(name, forget, results[name])
    return results


def print_network(name: str, forget: list[int], result: dict) -> None:
    print(f"\n== {name}: forget classes {forget}; roots {result['roots']}")
    print(f"{'model':<14}{'forget before':>14}{'after':>8}{'retrained':>10}{'kept before':>13}{'after':>8}"
          f"{'retrained':>10}{'alpha':>8}")
    for m in result["affected_models"]:
        b, a, r = m["before"], m["after"], m["retrained"]
        print(f"{m['id']:<14}{b['forget_acc']:>14.3f}{a['forget_acc']:>8.3f}{r['forget_acc']:>10.3f}"
              f"{b['retain_acc']:>13.3f}{a['retain_acc']:>8.3f}{r['retain_acc']:>10.3f}"
              f"{m['dampening']['alpha']:>8}")
    t = result["timing"]
    print(f"unlearn {t['unlearn_s']:.2f} s (forget-Fisher {t['forget_fisher_s']:.2f}, calibrate+dampen "
          f"{t['dampen_s']:.2f}); retrain {t['retrain_s']:.2f} s; ratio {t['unlearn_to_retrain']:.1%}; "
          f"retain-Fisher cache {t['retain_fisher_s']:.2f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="mnist", choices=["mnist", "digits", "synthetic", "cifar100"])
    parser.add_argument("--max-train", type=int, default=None, help="subsample the training split")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--forget", type=int, default=3)
    parser.add_argument("--second", type=int, default=7, help="the second root's class (multi-root)")
    parser.add_argument("--alpha", default="auto", help="'auto' or a fixed float")
    parser.add_argument("--fisher-layers", default="last")
    parser.add_argument("--estimator", default="per_sample", choices=["batch", "per_sample"])
    parser.add_argument("--mfim-mode", default="max")
    parser.add_argument("--fisher-samples", type=int, default=1024, help="cap per forget-Fisher pass (0: all)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    args = parser.parse_args()
    args.alpha = args.alpha if args.alpha == "auto" else float(args.alpha)
    torch.set_num_threads(1)
    logging.basicConfig(level=logging.WARNING)
    results = run(args)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
