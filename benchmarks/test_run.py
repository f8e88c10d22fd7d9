"""The main job's progress estimate (plain tests, marked smoke)."""

import pytest

from benchmarks.impls import Workload
from benchmarks.run import Estimator, _clock, work

pytestmark = pytest.mark.smoke


def test_estimator_fits_fixed_cost_plus_work():
    works = [1.0, 2.0, 4.0, 8.0, 16.0]
    est = Estimator(works)
    assert est.remaining(0) is None  # nothing finished yet: no estimate
    for i in range(3):
        est.add(i, 0.5 + 0.25 * works[i])  # a + b * work
    assert est.remaining(3) == pytest.approx((0.5 + 2.0) + (0.5 + 4.0))
    assert est.remaining(len(works)) == 0


def test_estimator_never_negative_and_work_grows_with_the_pass():
    est = Estimator([1.0, 100.0, 1.0])
    est.add(0, 3.0)
    est.add(1, 1.0)  # bigger work took less time (a loaded machine): no negative slope
    assert est.remaining(2) >= 0
    fwd, bwd = Workload("fwd", 16, 64, 32, 8), Workload("fwd+bwd", 16, 64, 32, 8)
    assert work(bwd) == 2 * work(fwd) == 2 * 16 * (64 * 32 + 8 * 96)


def test_clock():
    assert _clock(5) == "0:05" and _clock(125.4) == "2:05" and _clock(3725) == "1:02:05"
