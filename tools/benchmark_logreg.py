"""Benchmark: our PyTorch L-BFGS logistic regression against scikit-learn on the fine-grained C sweep.

Same synthetic features for both: 10,000 x 384 training features, 100 Gaussian class clusters with
enough noise that accuracy is far from 100 %, and a 5,000-sample test set from the same clusters.
Each solver fits all 45 C values of the sweep on the (z-scored) training set and is scored on the test
set; we report the best accuracy over the sweep and the total time.

    python -m tools.benchmark_logreg            # both solvers, the full sweep
    python -m tools.benchmark_logreg --quick    # 9 of the 45 C values
"""
import argparse
import json
import time
import warnings

import numpy as np
import torch

from common.config import CheckedArgumentParser
from common.errors import cli
from fine_grained.logreg import C_SWEEP, fit_logreg, zscore


def make_features(n_train=10_000, n_test=5_000, dim=384, classes=100, separation=0.2, seed=0):
    """Gaussian class clusters: centres N(0, separation^2 I), unit-variance noise -> (xtr, ytr, xte, yte)."""
    g = np.random.default_rng(seed)
    centres = g.normal(0, separation, (classes, dim))
    def draw(n):
        y = g.integers(0, classes, n)
        return (centres[y] + g.normal(0, 1, (n, dim))).astype(np.float32), y
    xtr, ytr = draw(n_train)
    xte, yte = draw(n_test)
    return xtr, ytr, xte, yte


def run_torch(xtr, ytr, xte, yte, cs, max_iter, tol):
    """Warm-started sweep from the most to the least regularised C (as `sweep_logreg` does)."""
    xtr, xte = zscore(torch.from_numpy(xtr), torch.from_numpy(xte))
    ytr, yte = torch.from_numpy(ytr), torch.from_numpy(yte)
    accs, prev, iters = {}, None, 0
    start = time.perf_counter()
    for c in sorted(cs):
        prev = fit_logreg(xtr, ytr, c, 100, init=prev, max_iter=max_iter, tol=tol)
        accs[c] = 100.0 * float((prev.decision_function(xte).argmax(1) == yte).float().mean())
        iters += prev.iterations
    return accs, time.perf_counter() - start, iters


def run_sklearn(xtr, ytr, xte, yte, cs, max_iter, tol):
    """scikit-learn's LogisticRegression (lbfgs, multinomial), one fresh fit per C, float64 as sklearn uses.

    sklearn >= 1.2 minimises the same mean-loss objective and its `tol` is the same max-|gradient| test.
    """
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    scaler = StandardScaler().fit(xtr)
    xtr, xte = scaler.transform(xtr), scaler.transform(xte)
    accs, iters = {}, 0
    start = time.perf_counter()
    for c in sorted(cs):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            clf = LogisticRegression(C=c, max_iter=max_iter, tol=tol).fit(xtr, ytr)
        accs[c] = 100.0 * clf.score(xte, yte)
        iters += int(np.max(clf.n_iter_))
    return accs, time.perf_counter() - start, iters


@cli("tools.benchmark_logreg")
def main(argv=None) -> int:
    p = CheckedArgumentParser("tools.benchmark_logreg", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="every 5th C value only (9 fits per solver)")
    p.add_argument("--max-iter", type=int, default=1000, help="iteration cap for both solvers (spec: 1000)")
    p.add_argument("--tol", type=float, default=1e-4,
                   help="both solvers: stop when max |gradient| of the mean-loss objective <= tol")
    p.add_argument("--skip-sklearn", action="store_true")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads for both solvers (torch and sklearn's BLAS); default: all")
    p.add_argument("--output", default=None, help="write the numbers as JSON here")
    args = p.parse_args(argv)

    if args.threads:
        from threadpoolctl import threadpool_limits  # installed with scikit-learn

        torch.set_num_threads(args.threads)
        threadpool_limits(args.threads)
    cs = C_SWEEP[::5] if args.quick else C_SWEEP
    xtr, ytr, xte, yte = make_features()
    print(f"features: train {xtr.shape}, test {xte.shape}, {len(cs)} C values, {torch.get_num_threads()} threads")
    ours, t_ours, it_ours = run_torch(xtr, ytr, xte, yte, cs, args.max_iter, args.tol)
    report = {"torch": {"best_acc": max(ours.values()), "seconds": t_ours, "iterations": it_ours,
                        "best_C": max(ours, key=ours.get)}}
    print(f"torch  : best acc {report['torch']['best_acc']:.2f} % in {t_ours:.1f} s ({it_ours} L-BFGS iterations)")
    if not args.skip_sklearn:
        theirs, t_sk, it_sk = run_sklearn(xtr, ytr, xte, yte, cs, args.max_iter, args.tol)
        report["sklearn"] = {"best_acc": max(theirs.values()), "seconds": t_sk, "iterations": it_sk,
                             "best_C": max(theirs, key=theirs.get)}
        print(f"sklearn: best acc {report['sklearn']['best_acc']:.2f} % in {t_sk:.1f} s ({it_sk} iterations)")
        report["speedup"] = t_sk / t_ours
        report["acc_gap"] = report["torch"]["best_acc"] - report["sklearn"]["best_acc"]
        print(f"speed-up x{report['speedup']:.1f}, accuracy gap {report['acc_gap']:+.2f} points")
        report["per_C"] = {f"{c:.3g}": {"torch": ours[c], "sklearn": theirs[c]} for c in sorted(cs)}
    if args.output:
        with open(args.output, "w") as f:
            json.dump(report, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
