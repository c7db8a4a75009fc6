"""Finetuning on a real local Ray cluster: 2 Ray Train workers, DeepSpeed ZeRO-2, a tiny model."""

from __future__ import annotations

import json
import os
import signal
import threading
import time

import pytest

from pathalign_ray.config import ConfigError, load_config
from pathalign_ray.generator.finetune import FinetuneConfig, finetune

pytestmark = pytest.mark.ray


def _config(run_dir, model_dir, samples, dataset, *overrides):
    return load_config(
        FinetuneConfig,
        None,
        [
            f"run_dir={run_dir}",
            f"base_model={model_dir}",
            f"data.samples=[{samples}]",
            f"data.real_dataset={dataset}",
            "train.batch_size=4",
            "train.log_every=1",
            "train.eval_per_class=1",
            "train.eval_ddim_steps=2",
            "scale.num_workers=2",
            "scale.zero_stage=2",
            *overrides,
        ],
    )


def _history(run_dir, name):
    return [json.loads(line) for line in (run_dir / f"{name}_metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def reward_endpoint(serve_port, tiny_pretrained, tmp_path_factory):
    """A reward model for the tiny model's classes, served over HTTP on the session's Serve instance."""
    import torch
    from ray import serve

    from pathalign_ray.generator.diffusion import load_model
    from pathalign_ray.reward.model import RewardModel, RewardModelConfig, save_reward_model
    from pathalign_ray.reward.serve import APP_NAME, ServeRewardConfig, start_reward_server

    _, _, model_dir = tiny_pretrained
    unet, _, class_names, _ = load_model(model_dir)
    torch.manual_seed(0)
    reward = RewardModel(
        RewardModelConfig(image_size=unet.config.sample_size, channels=(8, 16), class_embedding=8, hidden=16),
        class_names,
    )
    reward_dir = save_reward_model(
        reward.eval(), tmp_path_factory.mktemp("reward") / "r", {"id": "ft-test", "version": 1}
    )
    url = start_reward_server(ServeRewardConfig(model=str(reward_dir), port=serve_port, max_batch_size=32))
    yield url, reward_dir
    serve.delete(APP_NAME)


@pytest.mark.parametrize("objective", ["rwl", "rwl_centred", "ddpo"])
def test_each_objective_finetunes_on_two_zero2_workers_scored_over_http(
    objective, reward_endpoint, tiny_pretrained, tiny_samples, tiny_dataset, tmp_path, capsys
):
    import numpy as np
    import torch
    from diffusers import UNet2DModel

    from pathalign_ray.generator.sampling import read_manifest
    from pathalign_ray.images import decode_image
    from pathalign_ray.reward.functions import RewardSourceConfig, make_reward_fn

    url, reward_dir = reward_endpoint
    _, _, model_dir = tiny_pretrained
    config = _config(
        tmp_path,
        model_dir,
        tiny_samples,
        tiny_dataset,
        f"name={objective}",
        f"objective.kind={objective.split('_')[0]}",
        "reward.kind=http",
        f"reward.url={url}",
        "train.steps=3",
        "train.checkpoint_every=3",
        "train.eval_every=0",
        "objective.ddim_steps=3",
        "objective.trajectories_per_step=2",
        "objective.kl_coef=0.1",
        *(["objective.weighting=centred", "objective.ratio_clip=0.1"] if objective == "rwl_centred" else []),
    )
    exported = finetune(config).model_dir
    history = _history(tmp_path, objective)
    assert [row["step"] for row in history] == [1, 2, 3]
    terms = {
        "rwl": ("loss_weighted_synthetic", "loss_real", "weight_mean", "kl_to_base"),
        "rwl_centred": ("loss_weighted_synthetic", "loss_real", "loss_ratio_mean", "ratio_clip_fraction"),
        "ddpo": ("policy_loss", "approx_kl", "clipfrac", "kl_to_base"),
    }[objective]
    for row in history:
        assert all(np.isfinite(row[key]) for key in terms), row
        assert 0.0 <= row["reward_mean"] <= 1.0 and row["reward_std"] >= 0.0
        if objective == "ddpo":  # the pathologist's verdict on the step's trajectories, beside the reward's
            assert 0.0 <= row["trajectory_plausibility"] <= 1.0
    assert 0.0 <= history[-1]["fresh_plausibility"] <= 1.0 and "fresh_reward_mean" in history[-1]
    if objective == "rwl":
        # the pool was scored once, over HTTP, with exactly the scores the reward model gives in process
        manifest = read_manifest(tiny_samples).to_pylist()
        pixels = np.stack([decode_image((tiny_samples / row["path"]).read_bytes(), 16, "x") for row in manifest])
        classes = [row["declared_class"] for row in manifest]
        local, _ = make_reward_fn(RewardSourceConfig(kind="model", model=str(reward_dir)))(pixels, classes)
        served, info = make_reward_fn(RewardSourceConfig(kind="http", url=url))(pixels, classes)
        assert info["source"] == url and np.allclose(served, local, atol=1e-5)
        through_handle, _ = make_reward_fn(RewardSourceConfig(kind="handle"))(pixels, classes)
        assert np.allclose(through_handle, local, atol=1e-5)
        assert f"scored {len(manifest)} synthetic samples with {url}" in capsys.readouterr().out
        assert min(local) - 1e-6 <= history[0]["reward_mean"] <= max(local) + 1e-6
    finetuned = UNet2DModel.from_pretrained(exported, subfolder="unet")
    base = UNet2DModel.from_pretrained(model_dir, subfolder="unet")
    assert any(not torch.equal(a, b) for a, b in zip(finetuned.parameters(), base.parameters()))


@pytest.fixture(scope="module")
def tiny_latent(ray_cluster, tiny_dataset, tmp_path_factory):
    """A tiny latent model (VAE + class-embedding UNet2DConditionModel) of the tiny data set's classes and size,
    briefly trained, and 2 samples per class from it through jobs/sample.py's sampler: (model folder, samples)."""
    from pathalign_ray.data.shards import read_dataset_info
    from pathalign_ray.generator.sampling import SampleConfig, sample
    from pathalign_ray.generator.tiny import TinyLatentConfig, TinyTrainConfig, make_tiny_latent_model

    root = tmp_path_factory.mktemp("latent")
    model = TinyLatentConfig(
        image_size=16, vae_channels=(8, 8), unet_channels=(16, 16), norm_num_groups=4, num_train_timesteps=100
    )
    model_dir = make_tiny_latent_model(
        root / "model",
        n_per_class=4,
        classes=tuple(read_dataset_info(tiny_dataset)["class_names"]),
        model=model,
        train=TinyTrainConfig(vae_steps=10, unet_steps=10, batch_size=8),
    )
    samples = sample(SampleConfig(model=str(model_dir), out_dir=str(root / "samples"), n_per_class=2, ddim_steps=2))
    return model_dir, samples


@pytest.mark.parametrize("objective", ["rwl", "ddpo"])
def test_lora_on_the_latent_model_checkpoints_the_adapter_and_exports_what_it_sampled(
    objective, reward_endpoint, tiny_latent, tiny_dataset, tmp_path
):
    """rwl: base folder + adapter, resumed from a checkpoint once; ddpo: the merged export. Either way plain
    diffusers loads the export, and its images score what the job's own check scored on the EMA model in memory
    (ema_decay 0: the EMA is the trained adapter, which moves the images)."""
    import numpy as np
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from safetensors.torch import load_file

    from pathalign_ray.generator import ddim as gddim
    from pathalign_ray.generator import load_generator
    from pathalign_ray.generator.diffusion import namespaced_seed, to_uint8
    from pathalign_ray.generator.lora import LORA_WEIGHT_NAME
    from pathalign_ray.reward.functions import RewardSourceConfig, make_reward_fn
    from pathalign_ray.training import DEEPSPEED_TAG, EMA_FILE

    url, _ = reward_endpoint
    model_dir, samples = tiny_latent
    merged = objective == "ddpo"

    def run(steps):
        return finetune(
            _config(
                tmp_path,
                model_dir,
                samples,
                tiny_dataset,
                f"name={objective}",
                f"objective.kind={objective}",
                "reward.kind=http",
                f"reward.url={url}",
                f"train.steps={steps}",
                "train.checkpoint_every=1",
                "train.eval_every=0",
                "train.lr=1e-2",
                "train.ema_decay=0",
                "objective.ddim_steps=3",
                "objective.trajectories_per_step=2",
                "objective.kl_coef=0.1",
                "lora.rank=4",
                f"lora.merged_export={merged}",
                *(["objective.weighting=centred", "objective.ratio_clip=0.1"] if objective == "rwl" else []),
            )
        )

    if objective == "rwl":
        run(1)
    exported = run(2).model_dir
    history = _history(tmp_path, objective)
    assert [row["step"] for row in history] == [1, 2]
    terms = (
        ("loss_weighted_synthetic", "loss_real", "loss_ratio_mean")
        if objective == "rwl"
        else ("policy_loss", "kl_to_base")
    )
    assert all(np.isfinite(row[key]) for row in history for key in terms), history

    checkpoint = max(path for path in (tmp_path / objective).glob("checkpoint_*") if path.is_dir())
    assert all(".lora_" in name for name in load_file(checkpoint / EMA_FILE))
    module = torch.load(checkpoint / DEEPSPEED_TAG / "mp_rank_00_model_states.pt", weights_only=False)["module"]
    assert module and all(".lora_" in name for name in module), "the checkpoint holds the adapter only"

    info = json.loads((exported / "pathalign.json").read_text())
    assert info["step"] == 2 and info["generator"] == "latent" and info["lora_merged"] is merged
    unet = UNet2DConditionModel.from_pretrained(exported, subfolder="unet")
    assert (exported / LORA_WEIGHT_NAME).is_file() is not merged
    if not merged:
        base = UNet2DConditionModel.from_pretrained(model_dir, subfolder="unet")
        assert all(torch.equal(a, b) for a, b in zip(unet.parameters(), base.parameters()))
        unet.load_lora_adapter(exported, prefix="unet", weight_name=LORA_WEIGHT_NAME)
    vae = AutoencoderKL.from_pretrained(exported, subfolder="vae")
    scheduler = DDIMScheduler.from_pretrained(exported, subfolder="scheduler")

    # the job's check: eval_per_class=1 image per class, its "check" seeds, eval_ddim_steps=2, eta 0
    class_names = json.loads((exported / "class_names.json").read_text())
    labels = torch.arange(len(class_names))
    seeds = [namespaced_seed("check", 0, c, 0) for c in range(len(class_names))]
    with torch.no_grad():
        latents = gddim.ddim_sample_from(
            lambda x, t: unet(x, t, None, class_labels=labels).sample,
            scheduler,
            (unet.config.in_channels, unet.config.sample_size, unet.config.sample_size),
            seeds,
            2,
        )
        images = vae.decode(latents / vae.config.scaling_factor).sample.clamp(-1, 1)
    ours = load_generator(exported).sample(labels, seeds, 2)
    torch.testing.assert_close(images, ours, atol=1e-5, rtol=0)
    assert not torch.allclose(images, load_generator(model_dir).sample(labels, seeds, 2), atol=1e-3), (
        "the adapter moved"
    )
    rewards, _ = make_reward_fn(RewardSourceConfig(kind="http", url=url))(to_uint8(images), class_names)
    assert float(np.mean(rewards)) == pytest.approx(history[-1]["fresh_reward_mean"], abs=2e-3)


def test_a_killed_worker_is_replaced_and_the_run_resumes(tiny_pretrained, tiny_samples, tiny_dataset, tmp_path):
    import ray
    from ray.util.state import list_actors

    address = ray.get_runtime_context().gcs_address  # explicit: other Ray clusters may share this machine
    _, _, model_dir = tiny_pretrained
    config = _config(
        tmp_path,
        model_dir,
        tiny_samples,
        tiny_dataset,
        "name=faulty",
        "reward.kind=pathologist",
        "train.steps=14",
        "train.checkpoint_every=2",
        "train.eval_every=0",
    )
    outcome = {}
    runner = threading.Thread(target=lambda: outcome.setdefault("model", finetune(config).model_dir))
    runner.start()
    deadline = time.time() + 240
    while not list((tmp_path / "faulty").glob("checkpoint_*")) and time.time() < deadline:
        time.sleep(0.2)
    workers = list_actors(address=address, filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")])
    assert len(workers) == 2, workers
    os.kill(workers[1].pid, signal.SIGKILL)
    runner.join(timeout=300)
    assert not runner.is_alive() and "model" in outcome
    steps = [row["step"] for row in _history(tmp_path, "faulty")]
    assert steps == list(range(1, 15)), "the restored run continues the step count from its checkpoint"
    assert json.loads((outcome["model"] / "pathalign.json").read_text())["step"] == 14
    all_workers = list_actors(address=address, filters=[("class_name", "=", "RayTrainWorker")])
    assert len(all_workers) >= 4, "a new worker group replaced the one that lost a worker"


def test_config_errors_before_ray_starts(tmp_path):
    with pytest.raises(ConfigError, match="objective rwl needs data.samples"):
        load_config(FinetuneConfig, None, ["data.samples=[]"])
    with pytest.raises(ConfigError, match="ddpo needs eta > 0"):
        load_config(FinetuneConfig, None, ["objective.kind=ddpo", "objective.eta=0", "data.real_dataset=x"])
    with pytest.raises(ConfigError, match="beta > 0 needs data.real_dataset"):
        load_config(FinetuneConfig, None, ["data.samples=[x]"])
    with pytest.raises(ConfigError, match="weighting centred needs ratio_clip > 0"):
        load_config(FinetuneConfig, None, ["objective.weighting=centred", "data.samples=[x]", "data.real_dataset=x"])
    with pytest.raises(ConfigError, match=r"objective\.ratio_clip: Input should be less than 1"):
        load_config(FinetuneConfig, None, ["objective.ratio_clip=1.5", "data.samples=[x]", "data.real_dataset=x"])
    with pytest.raises(ConfigError, match=r"lora\.rank: Input should be greater than 0"):
        load_config(FinetuneConfig, None, ["lora.rank=0", "data.samples=[x]", "data.real_dataset=x"])
