"""The arithmetic of the feedback-weight search, as pure functions: objective, Pareto front, report plan, concurrency.

The search maximises plausibility gained over the base model, less penalties for what the paper
warns feedback must not cost: fidelity (a higher Frechet distance) and diversity (lost coverage).

    gain             = plausibility - base_plausibility
    fid_penalty      = fid_weight * max(0, fid / base_fid - 1)        (relative worsening; scale-free)
    coverage_penalty = coverage_weight * max(0, base_coverage - coverage)
    objective        = gain - fid_penalty - coverage_penalty

An improvement in FID or coverage earns nothing: the search is for plausibility, and the penalties
only keep it from being bought with fidelity or diversity. numpy only; no Ray, no I/O.
"""

from __future__ import annotations

import math

import numpy as np


def objective_terms(
    plausibility,
    fid,
    coverage,
    base_plausibility: float,
    base_fid: float,
    base_coverage: float,
    fid_weight: float,
    coverage_weight: float,
) -> dict[str, np.ndarray]:
    """{"gain", "fid_penalty", "coverage_penalty", "objective"} for scalars or arrays of equal shape.

    base_fid must be > 0 (a model's FID against a finite real set is); NaN in any input gives NaN.
    """
    if not base_fid > 0:
        raise ValueError(f"base_fid must be > 0 (the relative FID penalty divides by it), got {base_fid}")
    if fid_weight < 0 or coverage_weight < 0:
        raise ValueError(f"penalty weights must be >= 0, got fid {fid_weight}, coverage {coverage_weight}")
    plausibility, fid, coverage = (np.asarray(x, dtype=np.float64) for x in (plausibility, fid, coverage))
    gain = plausibility - base_plausibility
    fid_penalty = fid_weight * np.maximum(fid / base_fid - 1.0, 0.0)
    coverage_penalty = coverage_weight * np.maximum(base_coverage - coverage, 0.0)
    # np.maximum propagates NaN, so a trial with an unmeasured term never looks good
    return {
        "gain": gain,
        "fid_penalty": fid_penalty,
        "coverage_penalty": coverage_penalty,
        "objective": gain - fid_penalty - coverage_penalty,
    }


def pareto_front(plausibility, fid) -> np.ndarray:
    """(N,) bool: the trials no other trial beats on both plausibility (higher) and FID (lower).

    j dominates i when plausibility_j >= plausibility_i and fid_j <= fid_i, one of them strictly.
    Equal points do not dominate each other (both stay on the front). A NaN point is never on it
    and dominates nothing.
    """
    p, f = np.asarray(plausibility, np.float64), np.asarray(fid, np.float64)
    if p.shape != f.shape or p.ndim != 1:
        raise ValueError(f"plausibility and fid must be (N,) arrays of one length, got {p.shape} and {f.shape}")
    valid = ~(np.isnan(p) | np.isnan(f))
    no_worse = (p[None, :] >= p[:, None]) & (f[None, :] <= f[:, None])  # [i, j]: j no worse than i
    better = (p[None, :] > p[:, None]) | (f[None, :] < f[:, None])
    dominated = (no_worse & better & valid[None, :]).any(axis=1)
    return valid & ~dominated


def report_steps(total_steps: int, report_every: int) -> list[int]:
    """The finetuning step counts after which a trial reports: report_every, 2 report_every, ..., total_steps.

    (10, 4) -> [4, 8, 10]. ASHA's time unit is one report, so trials of different lengths are
    compared at the same step counts.
    """
    if total_steps < 1 or report_every < 1:
        raise ValueError(f"total_steps and report_every must be >= 1, got {total_steps}, {report_every}")
    return [min(k * report_every, total_steps) for k in range(1, math.ceil(total_steps / report_every) + 1)]


def trial_concurrency(cluster_cpus: float, cpus_per_trial: float, requested: int) -> int:
    """How many trials may run at once: `requested`, or with requested = 0 as many as the cluster's CPUs hold.

    A trial's own process reserves no CPU; its Ray Train workers reserve cpus_per_trial together.
    Asking for more than fit would only queue Ray Train runs behind each other's placement groups
    while Tune thinks they run, so the result is capped at what fits. A cluster too small for even
    one trial is an error, not a hang.
    """
    if cpus_per_trial <= 0 or requested < 0:
        raise ValueError(f"cpus_per_trial must be > 0 and requested >= 0, got {cpus_per_trial}, {requested}")
    fits = int(cluster_cpus // cpus_per_trial)
    if fits < 1:
        raise ValueError(
            f"one trial needs {cpus_per_trial:g} CPUs for its Ray Train workers (scale.num_workers x "
            f"scale.threads_per_worker) but the cluster has {cluster_cpus:g}: lower them or add nodes"
        )
    return fits if requested == 0 else min(requested, fits)
