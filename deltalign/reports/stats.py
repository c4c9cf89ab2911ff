"""The statistics of the eval tables: intervals for rates and means, paired win rates, a length-controlled win rate.

Pure functions of plain lists (numpy only), deterministic for a given ``seed``:

- :func:`wilson` — the 95% Wilson score interval of a rate ``k / n`` (a pass rate, an accuracy; ``k`` may hold
  halves for ties).
- :func:`mean_interval` — a mean with its 95% percentile bootstrap interval (RM score, KL, length).
- :func:`wins` / :func:`win_rate` — per-prompt outcomes of a policy against a baseline (1 better, 0.5 tie, 0
  worse) and their mean with a 95% *paired* bootstrap interval: prompts are resampled, each keeping both answers.
- :func:`lc_win_rate` — AlpacaEval-2 style length control: a logistic regression of the outcome on the length
  difference (policy minus baseline, scaled by its standard deviation) read at equal length, ``sigmoid(a)``,
  with the interval of the same bootstrap resamples.
"""

from __future__ import annotations

import math

import numpy as np

Z95 = 1.959963984540054
N_BOOT = 1000
SEED = 0


def wilson(k: float, n: int, z: float = Z95) -> tuple[float, float]:
    """``(low, high)`` of the Wilson score interval of the rate ``k / n``; ``(0, 1)`` when ``n == 0``."""
    if n <= 0:
        return 0.0, 1.0
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)


def _resamples(n: int, n_boot: int, seed: int) -> np.ndarray:
    """``[n_boot, n]`` row indices drawn with replacement (the same for every statistic of one seed)."""
    return np.random.default_rng(seed).integers(0, n, size=(n_boot, n))


def _percentiles(values: np.ndarray) -> tuple[float, float]:
    lo, hi = np.percentile(values, [2.5, 97.5])
    return float(lo), float(hi)


def mean_interval(values, n_boot: int = N_BOOT, seed: int = SEED) -> tuple[float, tuple[float, float]]:
    """``(mean, (low, high))``: the 95% percentile bootstrap interval of the mean of ``values``."""
    x = np.asarray(values, dtype=np.float64)
    if x.size == 0:
        raise ValueError("mean_interval: no values")
    return float(x.mean()), _percentiles(x[_resamples(x.size, n_boot, seed)].mean(axis=1))


def wins(policy_scores, baseline_scores) -> list[float]:
    """Per-prompt outcome of the policy's answer against the baseline's: 1 higher score, 0.5 equal, 0 lower."""
    if len(policy_scores) != len(baseline_scores):
        raise ValueError(f"{len(policy_scores)} policy scores but {len(baseline_scores)} baseline scores")
    return [1.0 if p > b else 0.5 if p == b else 0.0 for p, b in zip(policy_scores, baseline_scores)]


def win_rate(policy_scores, baseline_scores, n_boot: int = N_BOOT,
             seed: int = SEED) -> tuple[float, tuple[float, float]]:
    """``(win rate, (low, high))`` with ties counted half; the interval is the paired bootstrap's (each resample
    draws prompts, and a prompt brings both its answers)."""
    return mean_interval(wins(policy_scores, baseline_scores), n_boot, seed)


def logistic_fit(y: np.ndarray, x: np.ndarray, steps: int = 30, ridge: float = 1e-3) -> tuple[float, float]:
    """``(a, b)`` maximising ``sum y log s + (1 - y) log (1 - s)``, ``s = sigmoid(a + b x)``, ``y`` in [0, 1]
    (halves allowed), by Newton steps; ``ridge`` (on ``b`` only) keeps separable data finite."""
    a, b = 0.0, 0.0
    for _ in range(steps):
        s = 1.0 / (1.0 + np.exp(-(a + b * x)))
        w = np.maximum(s * (1 - s), 1e-12)
        g = np.array([np.sum(y - s), np.sum((y - s) * x) - ridge * b])
        h = np.array([[np.sum(w), np.sum(w * x)], [np.sum(w * x), np.sum(w * x * x) + ridge]])
        da, db = np.linalg.solve(h, g)
        a, b = a + float(da), b + float(db)
        if abs(da) < 1e-10 and abs(db) < 1e-10:
            break
    return a, b


def _lc(y: np.ndarray, d: np.ndarray) -> float:
    mean = float(y.mean())
    if mean in (0.0, 1.0):  # every answer won (or lost): at equal length too
        return mean
    sd = float(d.std())
    a, _ = logistic_fit(y, d / sd if sd > 0 else d)
    return 1.0 / (1.0 + math.exp(-a))


def lc_win_rate(outcomes, length_diff, n_boot: int = N_BOOT,
                seed: int = SEED) -> tuple[float, tuple[float, float]]:
    """``(length-controlled win rate, (low, high))``: the fitted win probability at a length difference of 0.

    ``outcomes`` from :func:`wins`, ``length_diff`` the policy's response length minus the baseline's, per prompt.
    The interval refits on the same paired resamples as :func:`win_rate` (same ``seed``)."""
    y, d = np.asarray(outcomes, dtype=np.float64), np.asarray(length_diff, dtype=np.float64)
    if y.size == 0 or y.size != d.size:
        raise ValueError(f"lc_win_rate: {y.size} outcomes and {d.size} length differences")
    boots = np.array([_lc(y[i], d[i]) for i in _resamples(y.size, n_boot, seed)])
    return _lc(y, d), _percentiles(boots)
