"""The loop over rounds: what each round samples from and learns from, and evaluation on noise it never drew."""

from __future__ import annotations

import json

import pytest
from conftest import TINY_ALIGN_OVERRIDES
from test_evaluation import TINY_CLASSIFIER

from pathalign_ray.align import plausibility_per_class, pool_allocation, pool_seed, round_verdicts
from pathalign_ray.generator.diffusion import SEED_NAMESPACES, derive_seed, namespaced_seed


def test_each_namespace_draws_other_seeds_than_every_other_and_than_plain_keys():
    keys = [(base, c, j) for base in (0, 1000) for c in range(4) for j in range(8)]
    seen = {}
    for namespace in SEED_NAMESPACES:
        seeds = {namespaced_seed(namespace, *k) for k in keys}
        assert len(seeds) == len(keys)
        for other, theirs in seen.items():
            assert not seeds & theirs, (namespace, other)
        seen[namespace] = seeds
    assert not set().union(*seen.values()) & {derive_seed(*k) for k in keys}
    assert namespaced_seed("pool", 1000, 2, 3) == namespaced_seed("pool", 1000, 2, 3)
    with pytest.raises(ValueError, match="unknown seed namespace 'pools'"):
        namespaced_seed("pools", 0, 0, 0)


def test_pool_seeds_are_one_per_seed_and_round():
    from pathalign_ray.align import AlignConfig
    from pathalign_ray.config import ConfigError, load_config

    assert len({pool_seed(seed, r) for seed in range(3) for r in range(5)}) == 15
    with pytest.raises(ConfigError, match=r"AlignConfig: rounds: Input should be less than or equal to 999"):
        load_config(AlignConfig, None, ["rounds=1000"])


def test_weakest_first_gives_rejected_classes_more_of_the_pool_and_solved_ones_a_floor():
    from pathalign_ray.generator.sampling import SampleConfig, plan_samples

    counts = pool_allocation({"a": 1.0, "b": 0.75, "c": 0.0, "d": 0.5}, total=100)
    assert sum(counts.values()) == 100
    assert counts == {
        "a": 13,
        "b": 12,
        "c": 50,
        "d": 25,
    }  # weights 0.25 (floor), 0.25, 1, 0.5 of 2; a tie goes first come
    assert pool_allocation({"a": 0.2, "b": 0.2}, total=7) in ({"a": 4, "b": 3}, {"a": 3, "b": 4})
    plan = plan_samples(SampleConfig(n_per_class=2, class_counts={"b": 3, "c": 0}), ["a", "b", "c"])
    assert [row["declared_class"] for row in plan] == ["a", "a", "b", "b", "b"]
    with pytest.raises(ValueError, match="unknown class 'z'"):
        plan_samples(SampleConfig(class_counts={"z": 1}), ["a"])
    with pytest.raises(ValueError, match="class_counts"):
        SampleConfig(class_counts={"a": -1})


@pytest.mark.ray
def test_two_rounds_compound_and_the_evaluation_refuses_a_pools_noise(tiny_pretrained, tiny_dataset, tmp_path):
    """Round 1 samples round 0's finetuned model and its reward model learns both rounds' verdicts; an
    evaluation set to round 1's pool noise is refused, naming both, and the default held-out noise runs."""
    import shutil
    from collections import Counter

    from pathalign_ray.align import AlignConfig, align
    from pathalign_ray.config import load_config
    from pathalign_ray.evaluation.evaluate import EvaluateConfig, evaluate
    from pathalign_ray.experts.feedback import FeedbackStore
    from pathalign_ray.generator.sampling import read_manifest

    _, _, model_dir = tiny_pretrained
    run = tmp_path / "run"
    run.mkdir()
    shutil.copytree(model_dir, run / "model")
    config = load_config(
        AlignConfig,
        None,
        [f"run_dir={run}", "rounds=2", "sample.n_per_class=3", "sample.ddim_steps=2", "simulate.experts=2", "allocation=weakest_first",
         f"reward.data.dataset={tiny_dataset}", *TINY_ALIGN_OVERRIDES],
    )  # fmt: skip
    rows = align(config)

    assert [row["round"] for row in rows] == [0, 1]
    assert [row["labels"] for row in rows] == [24, 48]  # 12 samples a round, 2 experts each
    round0_model = json.loads((run / "round0-model" / "pathalign.json").read_text())["model_id"]
    pools = [read_manifest(run / f"rounds/{r}/samples").to_pylist() for r in range(2)]
    assert {row["model_id"] for row in pools[1]} == {round0_model}
    assert {row["namespace"] for pool in pools for row in pool} == {"pool"}
    assert not {row["seed"] for row in pools[0]} & {row["seed"] for row in pools[1]}
    store = FeedbackStore(run / "feedback")  # weakest_first: round 1's pool follows round 0's verdicts per class
    wanted = pool_allocation(plausibility_per_class(round_verdicts(store, str(run), 0)), 12)
    assert Counter(row["declared_class"] for row in pools[1]) == Counter({k: v for k, v in wanted.items() if v})
    reward = json.loads((run / "reward" / "reward.json").read_text())
    experts = reward["label_counts"]["train"]["expert"]["images"] + reward["label_counts"]["test"]["expert"]["images"]
    assert reward["version"] == 1 and experts == 24  # every sample of both rounds

    overrides = [
        f"models=[{run / 'round1-model'}]", f"real={tiny_dataset}", f"out_dir={tmp_path / 'report'}",
        "sampling.n_per_class=3", "sampling.ddim_steps=2", "prdc_k=2", "grid_per_class=2", "cache_encoder=false",
        *[f"encoder.{o}" for o in TINY_CLASSIFIER], *[f"utility.{o}" for o in TINY_CLASSIFIER],
    ]  # fmt: skip
    on_the_pool = [*overrides, "sampling.namespace=pool", f"sampling.seed={pool_seed(0, 1)}"]
    with pytest.raises(ValueError, match=r"sampling\.namespace=pool sampling\.seed=1 .*12 in .*rounds/1/samples"):
        evaluate(load_config(EvaluateConfig, "configs/evaluate.yaml", on_the_pool))
    assert not (tmp_path / "report").exists()  # refused before anything was written

    report = evaluate(load_config(EvaluateConfig, "configs/evaluate.yaml", overrides))
    metrics = json.loads((report / "metrics.json").read_text())
    assert metrics["sets"]["round1-model"]["n_images"] == 12
    assert {row["namespace"] for row in read_manifest(report / "samples" / "round1-model").to_pylist()} == {
        "evaluation"
    }
