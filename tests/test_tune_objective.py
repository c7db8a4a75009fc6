"""The search's arithmetic, golden numbers on small arrays: objective, Pareto front, report plan, concurrency."""

from __future__ import annotations

import math

import numpy as np
import pytest

from pathalign_ray.tune.objective import objective_terms, pareto_front, report_steps, trial_concurrency


def test_objective_is_gain_less_fid_and_coverage_penalties():
    terms = objective_terms(
        plausibility=[0.50, 0.30, 0.60, 0.40],
        fid=[10.0, 12.0, 8.0, 15.0],
        coverage=[0.80, 0.90, 0.70, 0.85],
        base_plausibility=0.40,
        base_fid=10.0,
        base_coverage=0.80,
        fid_weight=0.5,
        coverage_weight=1.0,
    )
    np.testing.assert_allclose(terms["gain"], [0.10, -0.10, 0.20, 0.0], atol=1e-12)
    # FID 12 is 20 % worse: 0.5 * 0.2; FID 15: 0.5 * 0.5; a better FID (8) earns nothing
    np.testing.assert_allclose(terms["fid_penalty"], [0.0, 0.10, 0.0, 0.25], atol=1e-12)
    np.testing.assert_allclose(terms["coverage_penalty"], [0.0, 0.0, 0.10, 0.0], atol=1e-12)
    np.testing.assert_allclose(terms["objective"], [0.10, -0.20, 0.10, -0.25], atol=1e-12)


def test_objective_scalars_nan_and_bad_inputs():
    terms = objective_terms(0.7, 10.0, 0.5, 0.5, 10.0, 0.6, fid_weight=0.0, coverage_weight=2.0)
    assert float(terms["objective"]) == pytest.approx(0.2 - 0.2)
    assert math.isnan(float(objective_terms(0.7, 10.0, math.nan, 0.5, 10.0, 0.6, 0.5, 1.0)["objective"]))
    with pytest.raises(ValueError, match="base_fid must be > 0"):
        objective_terms(0.5, 1.0, 0.5, 0.5, 0.0, 0.5, 0.5, 1.0)
    with pytest.raises(ValueError, match="weights must be >= 0"):
        objective_terms(0.5, 1.0, 0.5, 0.5, 1.0, 0.5, -1.0, 1.0)


def test_pareto_front_maximises_plausibility_and_minimises_fid():
    plausibility = [0.2, 0.5, 0.5, 0.4, 0.6, 0.6, math.nan]
    fid = [5.0, 8.0, 9.0, 4.0, 12.0, 12.0, 1.0]
    # 0 is beaten by 3 (more plausible, lower FID); 2 by 1 (same plausibility, lower FID);
    # 4 and 5 are equal and both stay; the NaN trial is neither on the front nor dominates
    assert pareto_front(plausibility, fid).tolist() == [False, True, False, True, True, True, False]
    assert pareto_front([0.3], [7.0]).tolist() == [True]
    with pytest.raises(ValueError, match="one length"):
        pareto_front([0.1, 0.2], [1.0])


def test_report_steps():
    assert report_steps(10, 4) == [4, 8, 10]
    assert report_steps(200, 50) == [50, 100, 150, 200]
    assert report_steps(3, 5) == [3]
    with pytest.raises(ValueError):
        report_steps(0, 5)


def test_trial_concurrency_fits_the_cluster():
    assert trial_concurrency(4, 2, requested=0) == 2  # derived from the CPUs
    assert trial_concurrency(4, 2, requested=1) == 1
    assert trial_concurrency(4, 2, requested=8) == 2  # capped: more would only queue Ray Train runs
    assert trial_concurrency(2, 1, requested=0) == 2
    with pytest.raises(ValueError, match="needs 4 CPUs .* the cluster has 2"):
        trial_concurrency(2, 4, requested=1)
