"""deltalign/reports/stats.py against hand-computed values."""

import math

import pytest

from deltalign.reports import stats


def test_wilson_matches_the_textbook_interval():
    # 8 of 10: p = 0.8, z = 1.96; centre (0.8 + z^2/20) / (1 + z^2/10) = 0.71674,
    # half z / (1 + z^2/10) * sqrt(0.016 + z^2/400) = 0.22658
    lo, hi = stats.wilson(8, 10)
    assert lo == pytest.approx(0.49016, abs=1e-4) and hi == pytest.approx(0.94332, abs=1e-4)
    lo, hi = stats.wilson(0, 10)  # z^2 / (10 + z^2) = 0.27753 at the top, 0 at the bottom
    assert lo == 0.0 and hi == pytest.approx(0.27753, abs=1e-4)
    assert stats.wilson(10, 10)[1] == pytest.approx(1.0) and stats.wilson(0, 0) == (0.0, 1.0)
    assert stats.wilson(2.5, 5) == pytest.approx(tuple(1 - x for x in reversed(stats.wilson(2.5, 5))))  # symmetric


def test_wins_count_ties_half():
    assert stats.wins([3, 1, 2], [1, 1, 5]) == [1.0, 0.5, 0.0]
    with pytest.raises(ValueError):
        stats.wins([1], [1, 2])


def test_the_win_rate_interval_is_paired_and_deterministic():
    base = [float(i * i % 17) for i in range(50)]
    better = [b + 1 for b in base]  # every prompt's answer beats the baseline's, whatever the spread of scores
    rate, ci = stats.win_rate(better, base)
    assert rate == 1.0 and ci == (1.0, 1.0)
    mixed = [b + (1 if i % 4 else -1) for i, b in enumerate(base)]  # 37 of 50 win
    rate, (lo, hi) = stats.win_rate(mixed, base)
    assert rate == pytest.approx(37 / 50) and lo < rate < hi and hi - lo < 0.3
    assert stats.win_rate(mixed, base) == stats.win_rate(mixed, base)  # fixed seed: the same interval every time
    assert stats.win_rate(mixed, base, seed=1) != stats.win_rate(mixed, base)


def test_mean_interval():
    assert stats.mean_interval([2.0, 2.0, 2.0]) == (2.0, (2.0, 2.0))
    m, (lo, hi) = stats.mean_interval([0.0, 1.0] * 20)
    assert m == 0.5 and lo < 0.5 < hi


def test_lc_win_rate_reads_the_fit_at_equal_length():
    # equal lengths everywhere: the fit is the plain mean
    assert stats.lc_win_rate([1, 0, 0.5, 1], [0, 0, 0, 0])[0] == pytest.approx(0.625, abs=1e-6)
    # shorter answers (d = -1) win half the time, longer ones (d = +1) 4 of 5: the logistic fit reproduces both
    # group rates, so at d = 0 its logit is the mean of logit(0.5) = 0 and logit(0.8) = ln 4: sigmoid(ln 2) = 2/3,
    # below the raw win rate 5/7 that rewards length
    y, d = [0, 1, 1, 1, 1, 1, 0], [-1, -1, 1, 1, 1, 1, 1]
    lc, (lo, hi) = stats.lc_win_rate(y, d)
    assert lc == pytest.approx(2 / 3, abs=1e-3) and lo <= lc <= hi
    assert stats.lc_win_rate(y, [10 * x for x in d])[0] == pytest.approx(lc, abs=1e-9)  # the scale of d is free
    assert stats.lc_win_rate([1, 1], [3, -2]) == (1.0, (1.0, 1.0))


def test_logistic_fit_is_the_maximum_likelihood():
    import numpy as np

    y, x = np.array([0, 1, 0, 1, 1.0]), np.array([-2, -1, 0, 1, 2.0])
    a, b = stats.logistic_fit(y, x, ridge=0.0)
    s = 1 / (1 + np.exp(-(a + b * x)))
    assert abs(np.sum(y - s)) < 1e-9 and abs(np.sum((y - s) * x)) < 1e-9  # the score equations hold
    assert math.isfinite(stats.logistic_fit(np.array([0, 0, 1, 1.0]), np.array([-1, -1, 1, 1.0]))[1])  # separable
