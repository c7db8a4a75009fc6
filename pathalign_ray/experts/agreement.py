"""How much the experts agree with each other: Cohen's and Fleiss' kappa, and a per-class table.

Pure functions of labels and counts (numpy and the standard library only).
Kappa is undefined (0/0) when chance alone explains all agreement, i.e. every
rating falls in one category; then cohen_kappa and fleiss_kappa return nan
rather than 1.0 (agreement_table, which is JSON-ready, gives None): raters who
never use a second category have shown no ability to tell categories apart,
and percent agreement (1.0 there) already says they agreed.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

import numpy as np


def cohen_kappa(a: Sequence, b: Sequence) -> float:
    """Cohen's (1960) kappa of two raters' labels on the same items (any hashable labels).

        p_o = fraction of items with a[i] == b[i]
        p_e = sum_k P(a = k) P(b = k)          (each rater's own label frequencies)
        kappa = (p_o - p_e) / (1 - p_e)

    nan when p_e == 1 (both raters gave one and the same label to every item).
    """
    a, b = list(a), list(b)
    if len(a) != len(b) or not a:
        raise ValueError(f"cohen_kappa needs two equally long, non-empty label lists, got {len(a)} and {len(b)}")
    n = len(a)
    p_o = sum(x == y for x, y in zip(a, b)) / n
    count_a, count_b = Counter(a), Counter(b)
    p_e = sum(count_a[k] * count_b[k] for k in count_a) / n**2
    return float("nan") if p_e == 1.0 else (p_o - p_e) / (1.0 - p_e)


def fleiss_kappa(counts: np.ndarray) -> float:
    """Fleiss' (1971) kappa of N items each rated by the same number n >= 2 of raters.

    counts: (N, k) with counts[i, j] = how many raters put item i in category j;
    every row sums to n.  Raters may differ from item to item.

        P_i   = (sum_j counts[i, j]^2 - n) / (n (n - 1))    agreement on item i (pairs of raters that agree)
        P_bar = mean_i P_i
        p_j   = sum_i counts[i, j] / (N n)                   share of all ratings in category j
        P_e   = sum_j p_j^2
        kappa = (P_bar - P_e) / (1 - P_e)

    nan when P_e == 1 (every rating in one category).
    """
    counts = np.asarray(counts)
    if counts.ndim != 2 or counts.shape[0] < 1 or counts.shape[1] < 1:
        raise ValueError(f"counts must be (N_items, N_categories) with both >= 1, got shape {counts.shape}")
    if not np.issubdtype(counts.dtype, np.integer) and not np.array_equal(counts, np.round(counts)):
        raise ValueError("counts must be whole numbers of raters")
    counts = counts.astype(np.int64)
    if (counts < 0).any():
        raise ValueError("counts must be >= 0")
    raters = counts.sum(axis=1)
    n = int(raters[0])
    if n < 2 or (raters != n).any():
        sums = sorted(set(raters.tolist()))
        raise ValueError(f"every item needs the same number (>= 2) of ratings, got row sums {sums}")
    p_item = ((counts**2).sum(axis=1) - n) / (n * (n - 1))
    p_bar = p_item.mean()
    p_cat = counts.sum(axis=0) / (counts.shape[0] * n)
    p_e = float((p_cat**2).sum())
    return float("nan") if np.isclose(p_e, 1.0) else float((p_bar - p_e) / (1.0 - p_e))


def agreement_table(latest) -> dict:
    """Inter-expert agreement, overall and per declared class, from FeedbackStore.latest().

    `latest` is a table (pyarrow.Table or a dict of columns) with one verdict
    per (sample_id, expert_id) and the columns sample_id, declared_class,
    expert_id, verdict.  Only items judged by >= 2 experts count.  Each entry:

        n_items            items judged by >= 2 experts
        n_experts          distinct experts among them
        percent_agreement  mean over those items of the share of expert pairs that agree
                           (for two experts: the fraction of items they agree on)
        kappa, kappa_method  Cohen's kappa when exactly two experts judged them;
                           Fleiss' kappa when more, on the items judged by the modal
                           number of experts (ties: the larger number), since Fleiss'
                           formula needs a fixed number of ratings per item
        kappa_items, kappa_raters  the items and the ratings per item that kappa used

    Returns {"overall": entry, "per_class": {declared_class: entry}}, plain JSON-ready
    values: percent_agreement, kappa and kappa_method are None where undefined (no
    items; kappa also when every verdict is the same).
    """
    columns = {name: _column(latest, name) for name in ("sample_id", "declared_class", "expert_id", "verdict")}
    items: dict[str, tuple[str, dict[str, str]]] = {}
    for sample_id, declared_class, expert_id, verdict in zip(*columns.values()):
        votes = items.setdefault(sample_id, (declared_class, {}))[1]
        if expert_id in votes:
            raise ValueError(f"expert {expert_id!r} judged sample {sample_id!r} twice: pass the latest() view")
        votes[expert_id] = verdict
    classes = sorted({declared_class for declared_class, _ in items.values()})
    return {
        "overall": _agreement([votes for _, votes in items.values()]),
        "per_class": {c: _agreement([votes for dc, votes in items.values() if dc == c]) for c in classes},
    }


def _agreement(items: list[dict[str, str]]) -> dict:
    items = [votes for votes in items if len(votes) >= 2]
    experts = sorted({e for votes in items for e in votes})
    entry = {
        "n_items": len(items),
        "n_experts": len(experts),
        "percent_agreement": float(np.mean([_pair_agreement(v) for v in items])) if items else None,
        "kappa": None,
        "kappa_method": None,
        "kappa_items": 0,
        "kappa_raters": 0,
    }
    if len(experts) == 2:
        first, second = experts
        entry["kappa"] = cohen_kappa([v[first] for v in items], [v[second] for v in items])
        entry.update(kappa_method="cohen", kappa_items=len(items), kappa_raters=2)
    elif len(experts) > 2:
        sizes = Counter(len(votes) for votes in items)
        modal = max(sizes, key=lambda size: (sizes[size], size))
        used = [votes for votes in items if len(votes) == modal]
        categories = sorted({label for votes in used for label in votes.values()})
        counts = np.array([[list(votes.values()).count(c) for c in categories] for votes in used])
        entry["kappa"] = fleiss_kappa(counts)
        entry.update(kappa_method="fleiss", kappa_items=len(used), kappa_raters=modal)
    if entry["kappa"] is not None and np.isnan(entry["kappa"]):
        entry["kappa"] = None
    return entry


def _pair_agreement(votes: dict[str, str]) -> float:
    """Share of the pairs of raters of one item that gave it the same label (Fleiss' P_i)."""
    n = len(votes)
    return sum(c * (c - 1) for c in Counter(votes.values()).values()) / (n * (n - 1))


def _column(table, name: str) -> list:
    if hasattr(table, "column"):  # pyarrow.Table, without importing pyarrow here
        return table.column(name).to_pylist()
    return list(table[name])
