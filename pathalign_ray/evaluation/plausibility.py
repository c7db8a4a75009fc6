"""Plausibility summaries: rates per class and failure rates per checklist criterion, with Wilson intervals.

Two judges, one shape of summary:
- the simulated pathologist's verdicts on every evaluated image (`summarize_verdicts`);
- the experts' majority verdict per sample from a run's feedback store (`summarize_consensus`),
  where experts judged the very images evaluated (ties are counted apart and left out of the rate).

Every rate is {"rate", "low", "high", "successes", "n"}: the share, its Wilson interval at the
given confidence, and the counts. Pure numpy: no Ray, no I/O.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np

from pathalign_ray.evaluation.metrics import wilson_interval
from pathalign_ray.experts.checklist import CRITERIA


def rate(successes: int, n: int, confidence: float) -> dict:
    """{"rate": successes / n (NaN if n = 0), "low", "high" (Wilson interval), "successes", "n"}."""
    low, high = wilson_interval(int(successes), int(n), confidence)
    return {
        "rate": successes / n if n else math.nan,
        "low": low,
        "high": high,
        "successes": int(successes),
        "n": int(n),
    }


def summarize_verdicts(
    declared_classes: Sequence[str],
    plausible: np.ndarray,
    failed: np.ndarray,
    found_cell: np.ndarray,
    class_names: Sequence[str],
    confidence: float = 0.95,
) -> dict:
    """Summary of N verdicts: declared_classes (N,), plausible (N,) bool, failed (N, 6) bool in CRITERIA
    order, found_cell (N,) bool.

    Returns {"plausible": rate, "per_class": {class: rate}, "failure_rate": {criterion: rate},
    "failure_rate_per_class": {class: {criterion: rate}}, "no_cell": rate}; classes in class_names order,
    those without images left out of per_class.
    """
    declared = np.asarray(declared_classes, dtype=object)
    plausible, failed, found_cell = np.asarray(plausible, bool), np.asarray(failed, bool), np.asarray(found_cell, bool)
    if not (len(declared) == len(plausible) == len(failed) == len(found_cell)) or failed.shape[1:] != (len(CRITERIA),):
        raise ValueError(
            f"need N classes, (N,) plausible, (N, {len(CRITERIA)}) failed, (N,) found_cell; got {len(declared)}, "
            f"{plausible.shape}, {failed.shape}, {found_cell.shape}"
        )
    n = len(plausible)
    per_class, failure_per_class = {}, {}
    for name in class_names:
        members = declared == name
        if members.any():
            per_class[name] = rate(plausible[members].sum(), members.sum(), confidence)
            failure_per_class[name] = {
                c: rate(failed[members, i].sum(), members.sum(), confidence) for i, c in enumerate(CRITERIA)
            }
    return {
        "plausible": rate(plausible.sum(), n, confidence),
        "per_class": per_class,
        "failure_rate": {c: rate(failed[:, i].sum(), n, confidence) for i, c in enumerate(CRITERIA)},
        "failure_rate_per_class": failure_per_class,
        "no_cell": rate((~found_cell).sum(), n, confidence),
    }


def summarize_consensus(rows: Sequence[Mapping], class_names: Sequence[str], confidence: float = 0.95) -> dict:
    """Summary of the experts' consensus rows (FeedbackStore.consensus(), one per sample).

    A sample counts as plausible when its majority verdict is plausible; a tie (verdict None) is
    left out of every rate and counted in "ties". A criterion fails on a sample when the majority
    is implausible and some implausible vote names it.
    Returns {"plausible", "per_class", "failure_rate", "samples", "ties", "votes"}.
    """
    decided = [row for row in rows if row["verdict"] is not None]
    plausible = [row["verdict"] == "plausible" for row in decided]
    per_class = {}
    for name in class_names:
        verdicts = [p for row, p in zip(decided, plausible) if row["declared_class"] == name]
        if verdicts:
            per_class[name] = rate(sum(verdicts), len(verdicts), confidence)
    failures = {
        c: rate(
            sum(not p and c in row["failed_criteria"] for row, p in zip(decided, plausible)), len(decided), confidence
        )
        for c in CRITERIA
    }
    return {
        "plausible": rate(sum(plausible), len(decided), confidence),
        "per_class": per_class,
        "failure_rate": failures,
        "samples": len(rows),
        "ties": len(rows) - len(decided),
        "votes": int(sum(row["n_votes"] for row in rows)),
    }


def plausibility_per_round(rows: Sequence[Mapping], confidence: float = 0.95) -> list[dict]:
    """Expert verdict rows (FeedbackStore.latest(): round, verdict) -> [{"round", **rate}] by round,
    the share of plausible verdicts among all verdicts of that round."""
    rounds: dict[int, list[bool]] = {}
    for row in rows:
        rounds.setdefault(int(row["round"]), []).append(row["verdict"] == "plausible")
    return [{"round": r, **rate(sum(v), len(v), confidence)} for r, v in sorted(rounds.items())]
