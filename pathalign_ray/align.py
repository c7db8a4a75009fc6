"""The closed loop, round after round: sample -> expert feedback -> reward model -> finetune.

Round r samples from the model of round r-1 (the pretrained model in round 0) into
RUN_DIR/rounds/r/samples; experts judge them (simulated pathologists, or people on the labelling
page, the loop waiting until the round's quota is judged); the reward model is retrained on every
verdict so far plus weak feedback from the real images; the diffusion model is finetuned with it.
RUN_DIR/rounds.jsonl gets one row per round. A rerun skips the rounds already finished. RUN_DIR may
be a URI (s3://bucket/run): every stage then reads and writes the bucket (pathalign_ray.storage).
"""

from __future__ import annotations

import dataclasses
import json
import time
from typing import Annotated, Literal

from pydantic import Field

from pathalign_ray import storage
from pathalign_ray.config import Location, config_dataclass, refuse_overwritten
from pathalign_ray.experts.feedback import FeedbackStore
from pathalign_ray.experts.simulated_feedback import SimulateFeedbackConfig, simulate_feedback
from pathalign_ray.generator.finetune import FinetuneConfig, FinetuneDataConfig, FinetuneRecipe, finetune
from pathalign_ray.generator.sampling import SampleConfig, read_manifest, sample
from pathalign_ray.reward.functions import RewardSourceConfig
from pathalign_ray.reward.serve import ServeRewardConfig, start_reward_server
from pathalign_ray.reward.train import TrainRewardConfig, train_reward

ROUNDS_FILE = "rounds.jsonl"
ALLOCATION_FLOOR = 0.25  # weakest_first: a class's weight is at least this (a solved class keeps a quarter share)
# Keys of the sections below that each round sets (the round's model, folders, seed namespace, reward model)
SET_PER_ROUND = (
    "sample.model", "sample.out_dir", "sample.namespace", "sample.overwrite", "sample.class_counts",
    "simulate.run_dir", "simulate.samples", "simulate.round", "serve.model",
)  # fmt: skip


@config_dataclass
class AlignConfig:
    run_dir: Location = "runs/demo"  # path or URI: model/ from pretraining; rounds/, feedback/, reward/ go here too
    rounds: Annotated[int, Field(ge=1, le=999)] = 2  # feedback rounds; pool_seed keeps (seed, round) apart below 1,000
    feedback: Literal["simulated", "human"] = "simulated"  # human: wait for verdicts from the labelling page
    quota: int = 0  # human: verdicts a round needs before the loop goes on; 0: every sample judged once
    poll_s: float = 15.0  # human: seconds between looks at the feedback store
    # how a round's pool (sample.n_per_class x classes images) splits over the classes: even, or from round 1
    # on weakest_first, in proportion to each class's implausible share of the last round's verdicts
    allocation: Literal["even", "weakest_first"] = "even"
    # the keys in SET_PER_ROUND are the loop's, refused here; round r draws the "pool" seed namespace at base
    # seed sample.seed * 1000 + r
    sample: SampleConfig = dataclasses.field(default_factory=SampleConfig)
    simulate: SimulateFeedbackConfig = dataclasses.field(default_factory=SimulateFeedbackConfig)
    reward: TrainRewardConfig = dataclasses.field(default_factory=TrainRewardConfig)
    finetune: FinetuneRecipe = dataclasses.field(default_factory=FinetuneRecipe)  # models, pools, reward set per round
    # set: each round's reward model is deployed on Ray Serve and finetuning scores it over HTTP, as in
    # production; null: scored in-process
    serve: ServeRewardConfig | None = None

    def __post_init__(self) -> None:
        refuse_overwritten(self, SET_PER_ROUND, "set per round by the loop (RUN_DIR/rounds/R)")
        refuse_overwritten(self, ("reward.run_dir",), "set from run_dir")


def align(config: AlignConfig) -> list[dict]:
    """Run the rounds not yet finished; return every round's row."""
    run_dir = storage.absolute(config.run_dir)
    rows = read_rounds(run_dir)
    for round_index in range(len(rows), config.rounds):
        rows.append(run_round(config, run_dir, round_index))
        lines = "".join(json.dumps(row) + "\n" for row in rows)
        storage.write_bytes(storage.join(run_dir, ROUNDS_FILE), lines.encode())
        print(
            f"[align] round {round_index}: plausibility of its samples {rows[-1]['plausibility']:.1%}, "
            f"after finetuning {rows[-1]['fresh_plausibility_after']:.1%} ({rows[-1]['labels']} labels so far)"
        )
    return rows


def read_rounds(run_dir: str) -> list[dict]:
    """The rows of RUN_DIR/rounds.jsonl (a path or a URI); [] before the first round."""
    try:
        text = storage.read_bytes(storage.join(run_dir, ROUNDS_FILE)).decode()
    except FileNotFoundError:
        return []
    return [json.loads(line) for line in text.splitlines()]


def pool_seed(seed: int, round_index: int) -> int:
    """The base seed of round `round_index`'s pool, in the "pool" seed namespace: one per (seed, round)."""
    return seed * 1000 + round_index


def model_of_round(run_dir: str, round_index: int) -> str:
    """The model round `round_index` samples from: the pretrained one, then each round's finetuned one."""
    return storage.join(run_dir, "model" if round_index == 0 else f"round{round_index - 1}-model")


def run_round(config: AlignConfig, run_dir: str, round_index: int) -> dict:
    started = time.perf_counter()
    model = model_of_round(run_dir, round_index)
    row = collect_feedback(config, run_dir, round_index)
    recipe = {f.name: getattr(config.finetune, f.name) for f in dataclasses.fields(FinetuneRecipe)}
    finetuned = finetune(
        FinetuneConfig(
            **recipe,
            run_dir=run_dir,
            name=f"round{round_index}",
            base_model=model,
            data=FinetuneDataConfig(
                samples=tuple(storage.join(run_dir, f"rounds/{r}/samples") for r in range(round_index + 1)),
                real_dataset=config.reward.data.dataset,
            ),
            reward=reward_source(config, row.pop("reward_dir"), round_index),
        )
    )
    after = finetuned.final
    return {
        **row,
        "reward_mean": after.get("reward_mean"),
        "fresh_reward_after": after.get("fresh_reward_mean"),
        "fresh_plausibility_after": after.get("fresh_plausibility", float("nan")),
        "wall_s": time.perf_counter() - started,
    }


def reward_source(config: AlignConfig, reward_dir: str, round_index: int) -> RewardSourceConfig:
    """How the round's finetuning scores images: the reward model in-process, or its Serve endpoint over HTTP."""
    if config.serve is None:
        return RewardSourceConfig(kind="model", model=reward_dir)
    url = start_reward_server(dataclasses.replace(config.serve, model=reward_dir))  # redeploys from round 1 on
    print(f"[align] round {round_index}: reward model served at {url}v1/score")
    return RewardSourceConfig(kind="http", url=url.rstrip("/"))


def pool_allocation(plausibility: dict[str, float], total: int, floor: float = ALLOCATION_FLOOR) -> dict[str, int]:
    """Images per class for a pool of `total`: in proportion to max(1 - plausibility, floor), so a class the
    experts mostly reject gets more of their time and a solved one keeps a share (largest remainders)."""
    weights = {name: max(1.0 - rate, floor) for name, rate in plausibility.items()}
    exact = {name: total * weight / sum(weights.values()) for name, weight in weights.items()}
    counts = {name: int(value) for name, value in exact.items()}
    by_remainder = sorted(exact, key=lambda name: counts[name] - exact[name])
    for name in by_remainder[: total - sum(counts.values())]:
        counts[name] += 1
    return counts


def plausibility_per_class(verdicts: list[dict]) -> dict[str, float]:
    """{declared class: mean consensus plausibility} of a round's consensus rows."""
    rates: dict[str, list[float]] = {}
    for row in verdicts:
        rates.setdefault(row["declared_class"], []).append(row["plausibility"])
    return {name: sum(values) / len(values) for name, values in rates.items()}


def collect_feedback(config: AlignConfig, run_dir: str, round_index: int) -> dict:
    """The round before finetuning: sample from the round's model, get the verdicts, retrain the reward model.

    Returns the round's row so far: model, labels (all verdicts stored), the plausibility of the
    round's samples (consensus), the reward model's id, held-out AUC and folder (reward_dir).
    """
    model = model_of_round(run_dir, round_index)
    samples_rel = f"rounds/{round_index}/samples"
    store = FeedbackStore(storage.join(run_dir, "feedback"))
    class_counts = {}
    if config.allocation == "weakest_first" and round_index > 0:
        last = plausibility_per_class(round_verdicts(store, run_dir, round_index - 1))
        class_counts = pool_allocation(last, config.sample.n_per_class * len(last))
        print(f"[align] round {round_index}: pool per class {class_counts}")
    sample(
        dataclasses.replace(
            config.sample,
            model=model,
            out_dir=storage.join(run_dir, samples_rel),
            overwrite=True,
            namespace="pool",
            seed=pool_seed(config.sample.seed, round_index),
            class_counts=class_counts,
        )
    )
    if config.feedback == "simulated":
        simulate_feedback(dataclasses.replace(config.simulate, run_dir=run_dir, samples=samples_rel, round=round_index))
    else:
        _wait_for_verdicts(run_dir, samples_rel, config)
    verdicts = round_verdicts(store, run_dir, round_index)
    reward = train_reward(dataclasses.replace(config.reward, run_dir=run_dir))
    return {
        "round": round_index,
        "model": model,
        "labels": len(store.records()),
        "plausibility": sum(r["verdict"] == "plausible" for r in verdicts) / max(1, len(verdicts)),
        "reward_model": reward.info.get("model_id"),
        "reward_auc": reward.info.get("metrics", {}).get("test/expert/auc"),  # held-out verdicts on synthetic images
        "reward_dir": str(reward.model_dir),
    }


def round_verdicts(store, run_dir: str, round_index: int) -> list[dict]:
    """The consensus rows (FeedbackStore.consensus) of round `round_index`'s pool."""
    samples = storage.join(run_dir, f"rounds/{round_index}/samples")
    round_ids = {row["sample_id"] for row in read_manifest(samples).to_pylist()}
    return [row for row in store.consensus().to_pylist() if row["sample_id"] in round_ids]


def _wait_for_verdicts(run_dir: str, samples_rel: str, config: AlignConfig) -> None:
    """Block until people on the labelling page have judged the round's quota of samples."""
    sample_ids = {row["sample_id"] for row in read_manifest(storage.join(run_dir, samples_rel)).to_pylist()}
    quota = config.quota or len(sample_ids)
    store = FeedbackStore(storage.join(run_dir, "feedback"))
    while True:
        judged = sum(1 for row in store.latest().to_pylist() if row["sample_id"] in sample_ids)
        if judged >= quota:
            return
        print(
            f"[align] waiting for verdicts on {samples_rel}: {judged}/{quota} (labelling page: jobs/label.py samples={samples_rel})"
        )
        time.sleep(config.poll_s)
