"""The digits classifier by prompt next to the classic RBF SVC, on several seeded splits.

For each split seed, the recipe (configs/digits_classifier.yaml, ``data.split_seed`` set) trains on
the 80% train split and is scored on the 10% test split (180 images); on the very same split an RBF
SVC is fitted to the raw 64 pixels, both the classic ``SVC(gamma=0.001)`` of scikit-learn's digits
example and one tuned by 3-fold cross-validation on the train split. One 180-image test split moves
in steps of 0.56%, so the mean over splits is the figure to compare.

    python benchmarks/digits_vs_svc.py                  # seeds 0 1 2 3 4
    python benchmarks/digits_vs_svc.py --seeds 0 1 --override train.epochs=40
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
from sklearn.datasets import load_digits
from sklearn.model_selection import GridSearchCV
from sklearn.svm import SVC

from mmlm.api import train
from mmlm.config import load_config
from mmlm.data.digits import digits_split_indices

CONFIG = "configs/digits_classifier.yaml"


def svc_accuracies(seed: int) -> tuple[float, float]:
    """Test accuracy of the classic and the cross-validated RBF SVC on split ``seed``."""
    digits = load_digits()
    train_ids, test_ids = digits_split_indices("train", seed), digits_split_indices("test", seed)
    x, y = digits.data, digits.target
    classic = SVC(gamma=0.001).fit(x[train_ids], y[train_ids])
    grid = {"C": [1, 3, 10, 30], "gamma": [2.5e-4, 5e-4, 1e-3, 2e-3]}
    tuned = GridSearchCV(SVC(), grid, cv=3).fit(x[train_ids], y[train_ids])
    return classic.score(x[test_ids], y[test_ids]), tuned.score(x[test_ids], y[test_ids])


def ours_accuracy(config: str, seed: int, overrides: list[str], out_root: Path) -> tuple[float, float]:
    """Test accuracy of the recipe trained on split ``seed``, and its training seconds."""
    cfg = load_config(config, [f"data.split_seed={seed}", f"output_dir={out_root / f'split{seed}'}",
                               "train.save_every=null", "eval.num_examples=0", *overrides])
    result = train(cfg)
    return result["test/accuracy"], result["elapsed_s"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=CONFIG)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--override", nargs="*", default=[], help="dotted config overrides for the recipe")
    parser.add_argument("--out", default=None, help="run folders (default: a temporary folder)")
    args = parser.parse_args()

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        out_root = Path(args.out or tmp)
        for seed in args.seeds:
            started = time.perf_counter()
            ours, train_s = ours_accuracy(args.config, seed, args.override, out_root)
            classic, tuned = svc_accuracies(seed)
            rows.append((seed, ours, classic, tuned, train_s))
            print(f"split {seed}: mmlm {ours:.2%} ({train_s:.0f} s training, {time.perf_counter() - started:.0f} s "
                  f"in all)  SVC(gamma=0.001) {classic:.2%}  SVC tuned {tuned:.2%}", flush=True)

    print(f"\n{args.config} {' '.join(args.override)}")
    print(f"{'split':>6s} {'mmlm':>8s} {'SVC':>8s} {'SVC cv':>8s}")
    for seed, ours, classic, tuned, _ in rows:
        print(f"{seed:6d} {ours:8.2%} {classic:8.2%} {tuned:8.2%}")
    means = [statistics.mean(r[i] for r in rows) for i in (1, 2, 3)]
    print(f"{'mean':>6s} {means[0]:8.2%} {means[1]:8.2%} {means[2]:8.2%}")
    wins = sum(np.sign(r[1] - r[2]) for r in rows)
    print(f"mmlm - classic SVC: {means[0] - means[1]:+.2%} mean; per split sign sum {wins:+.0f} of {len(rows)}")


if __name__ == "__main__":
    main()
