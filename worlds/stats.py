"""The comparison's statistics: each mean with its 95 % interval by Student's t, and many intervals at once:
the paired table holds one interval per method and metric, and at 95 % about one
in twenty would exclude 0 by chance alone. Each difference gets an exact sign-flip test (under "no
difference" every pair's sign is a coin toss: the p-value is the share of the 2^n sign patterns whose mean
is at least as far from 0), and Holm's step-down correction keeps the family-wise error at 5 %."""
import math
import statistics

import numpy as np

# t quantile 0.975 for 1..30 degrees of freedom; 1.96 beyond
T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
        2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)
EXACT_PAIRS = 16  # 2^16 patterns exactly; beyond, 20,000 seeded random patterns


def mean_ci(values):
    """(mean, half-width of its 95 % confidence interval by Student's t; 0 for one value)."""
    values = [float(v) for v in values]
    if len(values) < 2:
        return (values[0] if values else float("nan")), 0.0
    t = T975[len(values) - 2] if len(values) - 1 <= len(T975) else 1.96
    return statistics.mean(values), t * statistics.stdev(values) / math.sqrt(len(values))


def sign_flip_p(differences):
    """Two-sided p-value of the mean paired difference under random signs; 1 for no pairs or all zeros."""
    d = np.asarray(differences, dtype=np.float64)
    if d.size == 0 or not d.any():
        return 1.0
    if d.size <= EXACT_PAIRS:  # every pattern: row i's signs are the bits of i
        signs = 1 - 2 * ((np.arange(2 ** d.size)[:, None] >> np.arange(d.size)) & 1)
    else:
        signs = np.random.default_rng(0).choice((1, -1), size=(20_000, d.size))
    means = np.abs(signs @ d) / d.size
    return float(np.mean(means >= abs(d.mean()) - 1e-12))  # ties count as "at least as far"


def holm(pvalues, alpha=0.05):
    """{key: survives}: Holm's step-down over {key: p}; the k-th smallest p (from 0) must be <= alpha/(m-k),
    and the first that is not stops every larger one."""
    ranked, m, keep, going = sorted(pvalues.items(), key=lambda kv: kv[1]), len(pvalues), {}, True
    for k, (key, p) in enumerate(ranked):
        going = going and p <= alpha / (m - k)
        keep[key] = going
    return keep


def paired_tests(pairs, metrics):
    """{(method, metric): {"p": sign-flip p, "holm": survives, "excludes_0": its 95 % t interval does}} from
    {method: [(against's metrics, the method's)]} (bench.pairs_of)."""
    diffs = {(m, k): [a[k] - o[k] for a, o in ps] for m, ps in pairs.items() for k in metrics
             if all(k in a and k in o for a, o in ps)}
    p = {key: sign_flip_p(d) for key, d in diffs.items()}
    survives = holm(p)
    intervals = {key: mean_ci(d) for key, d in diffs.items()}
    return {key: dict(p=p[key], holm=survives[key],
                      excludes_0=len(d) > 1 and abs(intervals[key][0]) > intervals[key][1]) for key, d in diffs.items()}


def multiplicity_note(tests):
    """One paragraph: how many intervals, how many exclude 0, how many would by chance, how many survive."""
    n, excluding = len(tests), sum(t["excludes_0"] for t in tests.values())
    surviving = [f"{m} / {k}" for (m, k), t in tests.items() if t["holm"]]
    return (f"Multiple comparisons: this table holds {n} intervals; {excluding} exclude 0, and about "
            f"{0.05 * n:.1f} would by chance alone at 95 %. Exact sign-flip tests with Holm's correction "
            f"(family-wise 5 %) keep {len(surviving)}" + (f": {', '.join(surviving)}." if surviving else "."))
