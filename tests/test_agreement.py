"""Golden numbers for Cohen's and Fleiss' kappa, their degenerate cases, and the per-class agreement table."""

from __future__ import annotations

import hashlib
import json
import math

import numpy as np
import pytest

from pathalign_ray.experts.agreement import agreement_table, cohen_kappa, fleiss_kappa

# Wikipedia, "Fleiss' kappa", worked example: 10 subjects, 14 raters, 5 categories; kappa = 0.210.
WIKIPEDIA_COUNTS = [
    [0, 0, 0, 0, 14],
    [0, 2, 6, 4, 2],
    [0, 0, 3, 5, 6],
    [0, 3, 9, 2, 0],
    [2, 2, 8, 1, 1],
    [7, 7, 0, 0, 0],
    [3, 2, 6, 3, 0],
    [2, 5, 3, 2, 2],
    [6, 5, 2, 1, 0],
    [0, 2, 2, 3, 7],
]

# Fleiss (1971), the paper's own example: 30 patients, 6 psychiatrists each, 5 diagnoses
# (the `diagnoses` data set of R's irr package; kappam.fleiss gives 0.4302445, the paper 0.430).
FLEISS_1971_DIAGNOSES = [
    [4, 4, 4, 4, 4, 4], [2, 2, 2, 5, 5, 5], [2, 3, 3, 3, 3, 5], [5, 5, 5, 5, 5, 5], [2, 2, 2, 4, 4, 4],
    [1, 1, 3, 3, 3, 3], [3, 3, 3, 3, 5, 5], [1, 1, 3, 3, 3, 4], [1, 1, 4, 4, 4, 4], [5, 5, 5, 5, 5, 5],
    [1, 4, 4, 4, 4, 4], [1, 2, 4, 4, 4, 4], [2, 2, 2, 3, 3, 3], [1, 4, 4, 4, 4, 4], [2, 2, 4, 4, 4, 5],
    [3, 3, 3, 3, 3, 5], [1, 1, 1, 4, 5, 5], [1, 1, 1, 1, 1, 2], [2, 2, 4, 4, 4, 4], [1, 3, 3, 5, 5, 5],
    [5, 5, 5, 5, 5, 5], [2, 4, 4, 4, 4, 4], [2, 2, 4, 5, 5, 5], [1, 1, 4, 4, 4, 4], [1, 4, 4, 4, 4, 5],
    [2, 2, 2, 2, 2, 4], [1, 1, 1, 1, 5, 5], [2, 2, 4, 4, 4, 4], [1, 3, 3, 3, 3, 3], [5, 5, 5, 5, 5, 5],
]  # fmt: skip


def test_fleiss_kappa_reproduces_the_wikipedia_example():
    assert round(fleiss_kappa(np.array(WIKIPEDIA_COUNTS)), 3) == 0.210


def test_fleiss_kappa_reproduces_fleiss_1971():
    ratings = np.array(FLEISS_1971_DIAGNOSES)
    counts = np.stack([(ratings == category).sum(axis=1) for category in range(1, 6)], axis=1)
    assert fleiss_kappa(counts) == pytest.approx(0.4302445, abs=1e-7)


def test_cohen_kappa_on_a_hand_computed_2x2_table():
    # yes/yes 20, yes/no 5, no/yes 10, no/no 15 of 50 items:
    # p_o = 35/50 = 0.7; p_e = 0.5 * 0.6 + 0.5 * 0.4 = 0.5; kappa = (0.7 - 0.5) / 0.5 = 0.4
    a = ["yes"] * 25 + ["no"] * 25
    b = ["yes"] * 20 + ["no"] * 5 + ["yes"] * 10 + ["no"] * 15
    assert cohen_kappa(a, b) == pytest.approx(0.4, abs=1e-12)


def test_perfect_agreement_is_one():
    labels = [1, 0, 1, 1, 0]
    assert cohen_kappa(labels, labels) == 1.0
    assert fleiss_kappa(np.array([[3, 0], [0, 3], [3, 0]])) == pytest.approx(1.0)


def test_chance_level_agreement_is_zero():
    # Every cell of the 2x2 table holds 25: the raters agree exactly as often as independent coins.
    a = [1] * 50 + [0] * 50
    b = ([1] * 25 + [0] * 25) * 2
    assert cohen_kappa(a, b) == pytest.approx(0.0, abs=1e-12)
    # P_bar = (1 + 1 + 0 + 0) / 4 = 0.5 = P_e = 0.5^2 + 0.5^2
    assert fleiss_kappa(np.array([[2, 0], [0, 2], [1, 1], [1, 1]])) == pytest.approx(0.0, abs=1e-12)


def test_systematic_disagreement_is_negative():
    assert cohen_kappa([1, 0, 1, 0], [0, 1, 0, 1]) == pytest.approx(-1.0)
    assert fleiss_kappa(np.array([[1, 1], [1, 1]])) == pytest.approx(-1.0)


def test_kappa_is_nan_when_every_rating_is_one_category():
    assert math.isnan(cohen_kappa([1, 1, 1], [1, 1, 1]))
    assert math.isnan(fleiss_kappa(np.array([[4, 0], [4, 0]])))


def test_cohen_kappa_matches_scikit_learn():
    sklearn_metrics = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(0)
    for _ in range(5):
        a = rng.integers(0, 2, 40)
        b = np.where(rng.random(40) < 0.7, a, 1 - a)
        assert cohen_kappa(a.tolist(), b.tolist()) == pytest.approx(sklearn_metrics.cohen_kappa_score(a, b))


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="equally long"):
        cohen_kappa([1, 0], [1])
    with pytest.raises(ValueError, match="same number"):
        fleiss_kappa(np.array([[2, 0], [1, 2]]))
    with pytest.raises(ValueError, match="same number"):
        fleiss_kappa(np.array([[1, 0], [0, 1]]))  # one rating per item
    with pytest.raises(ValueError, match=">= 0"):
        fleiss_kappa(np.array([[3, -1], [1, 1]]))


def _columns(votes: list[tuple[str, str, str, str]]) -> dict[str, list[str]]:
    names = ("sample_id", "declared_class", "expert_id", "verdict")
    return {name: [v[i] for v in votes] for i, name in enumerate(names)}


P, I = "plausible", "implausible"


def test_agreement_table_uses_cohen_for_two_experts_and_skips_single_votes():
    votes = [
        ("s1", "blast", "ann", P), ("s1", "blast", "bob", P),
        ("s2", "blast", "ann", I), ("s2", "blast", "bob", P),
        ("s3", "neutrophil", "ann", I), ("s3", "neutrophil", "bob", I),
        ("s4", "neutrophil", "ann", P), ("s4", "neutrophil", "bob", P),
        ("s5", "neutrophil", "ann", P),  # one expert only: left out
    ]  # fmt: skip
    table = agreement_table(_columns(votes))
    overall = table["overall"]
    assert (overall["n_items"], overall["n_experts"], overall["kappa_method"]) == (4, 2, "cohen")
    assert overall["percent_agreement"] == pytest.approx(0.75)
    # ann: P I I P, bob: P P I P -> p_o = 0.75, p_e = 0.5 * 0.75 + 0.5 * 0.25 = 0.5, kappa = 0.5
    assert overall["kappa"] == pytest.approx(0.5)
    blast, neutrophil = table["per_class"]["blast"], table["per_class"]["neutrophil"]
    assert blast["n_items"] == 2 and blast["percent_agreement"] == pytest.approx(0.5)
    assert neutrophil["n_items"] == 2 and neutrophil["kappa"] == pytest.approx(1.0)


def test_agreement_table_uses_fleiss_on_the_modal_number_of_raters():
    votes = [
        ("s1", "blast", "ann", P), ("s1", "blast", "bob", P), ("s1", "blast", "cat", P),
        ("s2", "blast", "ann", I), ("s2", "blast", "bob", I), ("s2", "blast", "cat", P),
        ("s3", "blast", "ann", I), ("s3", "blast", "bob", I), ("s3", "blast", "cat", I),
        ("s4", "blast", "ann", P), ("s4", "blast", "cat", I),  # two raters: in percent agreement, not in kappa
    ]  # fmt: skip
    entry = agreement_table(_columns(votes))["overall"]
    assert (entry["kappa_method"], entry["kappa_items"], entry["kappa_raters"]) == ("fleiss", 3, 3)
    assert entry["kappa"] == pytest.approx(fleiss_kappa(np.array([[3, 0], [1, 2], [0, 3]])))
    assert entry["percent_agreement"] == pytest.approx((1 + 1 / 3 + 1 + 0) / 4)
    assert (entry["n_items"], entry["n_experts"]) == (4, 3)


def test_agreement_table_with_no_shared_items_and_with_repeated_votes():
    entry = agreement_table(_columns([("s1", "blast", "ann", P), ("s2", "blast", "bob", I)]))["overall"]
    assert entry["n_items"] == 0 and entry["kappa_method"] is None
    assert entry["kappa"] is None and entry["percent_agreement"] is None
    unanimous = agreement_table(_columns([("s1", "blast", "ann", P), ("s1", "blast", "bob", P)]))["overall"]
    assert unanimous["percent_agreement"] == 1.0 and unanimous["kappa"] is None  # kappa is 0/0
    assert unanimous["kappa_method"] == "cohen"
    json.dumps(unanimous, allow_nan=False)  # JSON-ready
    with pytest.raises(ValueError, match="latest"):
        agreement_table(_columns([("s1", "blast", "ann", P), ("s1", "blast", "ann", I)]))


def test_agreement_table_reads_the_store_latest_view(tmp_path):
    from pathalign_ray.experts.feedback import FeedbackRecord, FeedbackStore

    store = FeedbackStore(tmp_path / "feedback")
    sha = hashlib.sha256(b"image").hexdigest()
    for expert, verdicts in (("ann", [P, I, P]), ("bob", [P, I, I])):
        store.append(
            [FeedbackRecord(f"s{i}", f"img/s{i}.png", sha, "blast", expert, v) for i, v in enumerate(verdicts)]
        )
    store.append([FeedbackRecord("s2", "img/s2.png", sha, "blast", "bob", P)])  # bob changes his mind
    entry = agreement_table(store.latest())["per_class"]["blast"]
    assert entry["n_items"] == 3 and entry["percent_agreement"] == 1.0 and entry["kappa"] == pytest.approx(1.0)
