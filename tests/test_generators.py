"""The generator interface on both implementations (pixel UNet2DModel, latent VAE + UNet2DConditionModel), LoRA."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("peft")

from diffusers import DDIMScheduler, UNet2DConditionModel

from pathalign_ray.generator import ddim as gddim
from pathalign_ray.generator import lora
from pathalign_ray.generator.base import Generator, load_generator
from pathalign_ray.generator.diffusion import ModelConfig, build_noise_scheduler, build_unet, ddim_sample
from pathalign_ray.generator.latent import LatentGenerator
from pathalign_ray.generator.pixel import PixelGenerator
from pathalign_ray.generator.tiny import TinyLatentConfig, TinyTrainConfig, build_tiny_latent, train_tiny_latent

CLASSES = ["myeloblast", "lymphocyte", "eosinophil"]
PIXEL = ModelConfig(sample_size=16, block_out_channels=(8, 16), norm_num_groups=4, num_train_timesteps=100)
LATENT = TinyLatentConfig(
    image_size=16,
    vae_channels=(8, 8),
    unet_channels=(16, 16),
    norm_num_groups=4,
    attention_head_dim=8,
    num_train_timesteps=100,
)
SEEDS = [11, 12, 13]
LABELS = torch.tensor([0, 1, 2])


def _pixel() -> PixelGenerator:
    torch.manual_seed(0)
    unet = build_unet(PIXEL, num_classes=len(CLASSES)).eval()
    return PixelGenerator(unet, DDIMScheduler.from_config(build_noise_scheduler(PIXEL).config), CLASSES)


def _latent(prediction_type: str = "epsilon") -> LatentGenerator:
    from dataclasses import replace

    generator = build_tiny_latent(replace(LATENT, prediction_type=prediction_type), CLASSES, seed=0)
    generator.unet.eval()
    return generator


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models: a second torch thread only adds synchronisation (and spins on a shared machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(params=["pixel", "latent"])
def generator(request):
    return _pixel() if request.param == "pixel" else _latent()


def _inputs(generator, seed: int = 0):
    """x_0 in model space (B, C, h, w), noise like it, timesteps (B,)."""
    g = torch.Generator().manual_seed(seed)
    latents = torch.randn(len(LABELS), *generator.latent_shape, generator=g)
    noise = torch.randn(latents.shape, generator=g)
    timesteps = torch.randint(0, generator.noise_scheduler.config.num_train_timesteps, (len(LABELS),), generator=g)
    return latents, noise, timesteps


def _predictions(generator, seed: int = 0) -> torch.Tensor:
    latents, noise, timesteps = _inputs(generator, seed)
    with torch.no_grad():
        return generator.predict_noise(latents, LABELS, noise, timesteps)[1]


def test_both_implement_the_protocol(generator):
    assert isinstance(generator, Generator)
    images = generator.sample(LABELS, SEEDS, 3)
    assert images.shape == (3, 3, generator.image_size, generator.image_size) and images.abs().max() <= 1
    assert generator.sample_uint8(LABELS, SEEDS, 3).shape == (3, generator.image_size, generator.image_size, 3)


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_pixel_generator_samples_as_ddim_sample(eta):
    generator = _pixel()
    expected = ddim_sample(generator.unet, DDIMScheduler.from_config(generator.ddim.config), LABELS, SEEDS, 4, eta)
    assert torch.equal(generator.sample(LABELS, SEEDS, 4, eta), expected)
    # the latent path's sampler draws the same noise in the same order: on pixels it is ddim_sample
    generic = gddim.ddim_sample_from(
        lambda x, t: generator.unet(x, t, class_labels=LABELS).sample,
        DDIMScheduler.from_config(generator.ddim.config),
        generator.latent_shape,
        SEEDS,
        4,
        eta,
    )
    assert torch.equal(generic.clamp(-1, 1), expected)


def test_generic_trajectory_follows_ddim_trajectories():
    from pathalign_ray.generator.objectives import ddim_trajectories

    generator = _pixel()
    expected = ddim_trajectories(generator.unet, generator.ddim, LABELS, 4, 1.0, torch.Generator().manual_seed(3))
    ours = gddim.ddim_trajectory(
        lambda x, t: generator.unet(x, t, class_labels=LABELS).sample,
        generator.ddim,
        3,
        generator.latent_shape,
        4,
        1.0,
        torch.Generator().manual_seed(3),
    )
    assert ours["timesteps"] == expected["timesteps"]
    for a, b in zip(ours["log_probs"], expected["log_probs"]):
        assert torch.equal(a, b)
    for a, b in zip(ours["latents"][:-1], expected["latents"][:-1]):
        assert torch.equal(a, b)
    assert torch.equal(ours["latents"][-1].clamp(-1, 1), expected["latents"][-1])


@pytest.mark.parametrize("eta", [0.5])
def test_same_seeds_same_images(generator, eta):
    first = generator.sample(LABELS, SEEDS, 4, eta)
    assert torch.equal(generator.sample(LABELS, SEEDS, 4, eta), first)
    alone = generator.sample(LABELS[1:2], SEEDS[1:2], 4, eta)  # a seed's image does not depend on its batch
    torch.testing.assert_close(alone[0], first[1], atol=1e-5, rtol=0)
    assert not torch.allclose(generator.sample(LABELS, [s + 100 for s in SEEDS], 4, eta), first)


def test_trajectory_log_probs_are_rescored_exactly(generator):
    """DDPO's ratio starts at 1: a step's log-probability recomputed under the same weights is the sampled one."""
    trajectory = generator.trajectories(LABELS, 4, 1.0, torch.Generator().manual_seed(5))
    assert len(trajectory["latents"]) == 5 and len(trajectory["log_probs"]) == 3
    images = generator.decode(trajectory["latents"][-1])
    assert images.shape == (3, 3, generator.image_size, generator.image_size)
    with torch.no_grad():
        for j, (t, prev_t) in enumerate(trajectory["timesteps"]):
            log_prob, _ = generator.step_log_prob(
                trajectory["latents"][j], trajectory["latents"][j + 1], t, prev_t, LABELS, 1.0
            )
            torch.testing.assert_close(log_prob, trajectory["log_probs"][j], atol=1e-5, rtol=1e-5)


def test_pixel_loss_is_diffusion_loss_per_sample():
    from pathalign_ray.generator.diffusion import diffusion_loss_per_sample

    generator = _pixel()
    latents, noise, timesteps = _inputs(generator)
    expected = diffusion_loss_per_sample(generator.unet, generator.noise_scheduler, latents, LABELS, noise, timesteps)
    assert torch.equal(generator.loss_per_sample(latents, LABELS, noise, timesteps), expected)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_latent_loss_matches_diffusers_training_loss(prediction_type):
    """diffusers' examples/text_to_image/train_text_to_image.py, step by step, on the same images, noise and timesteps."""
    from diffusers import DDPMScheduler

    generator = _latent(prediction_type)
    images = torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(1)) * 2 - 1
    _, noise, timesteps = _inputs(generator)
    # theirs
    vae, unet = generator.vae, generator.unet
    noise_scheduler = DDPMScheduler.from_config(generator.ddim.config)
    latents = vae.encode(images).latent_dist.sample(torch.Generator().manual_seed(2)) * vae.config.scaling_factor
    noisy_latents = noise_scheduler.add_noise(latents, noise, timesteps)
    target = noise if prediction_type == "epsilon" else noise_scheduler.get_velocity(latents, noise, timesteps)
    model_pred = unet(noisy_latents, timesteps, None, class_labels=LABELS).sample
    expected = F.mse_loss(model_pred.float(), target.float(), reduction="mean")
    # ours
    ours = generator.encode(images, generator=torch.Generator().manual_seed(2))
    assert torch.equal(ours, latents)
    torch.testing.assert_close(generator.loss_per_sample(ours, LABELS, noise, timesteps).mean(), expected)


def test_v_prediction_steps_as_the_scheduler():
    """to_epsilon + ddim_step_with_log_prob land where DDIMScheduler.step(prediction_type=v_prediction) lands."""
    from pathalign_ray.generator.objectives import ddim_step_with_log_prob

    ddim = DDIMScheduler(
        num_train_timesteps=100, beta_schedule="scaled_linear", clip_sample=False, prediction_type="v_prediction"
    )
    ddim.set_timesteps(4)
    g = torch.Generator().manual_seed(0)
    sample, v, noise = (torch.randn(2, 4, 4, 4, generator=g) for _ in range(3))
    t = int(ddim.timesteps[1])
    expected = ddim.step(v, t, sample, eta=1.0, variance_noise=noise).prev_sample
    epsilon = gddim.to_epsilon(v, sample, t, ddim.alphas_cumprod, "v_prediction")
    ours, _ = ddim_step_with_log_prob(
        ddim.alphas_cumprod,
        ddim.final_alpha_cumprod,
        epsilon,
        t,
        t - 25,
        sample,
        1.0,
        noise=noise,
        clip_sample_range=None,
    )
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=1e-5)


def _train_a_little(generator, steps: int = 3) -> None:
    optimizer = torch.optim.Adam(generator.trainable_parameters(), lr=3e-2)
    latents, noise, timesteps = _inputs(generator, seed=9)
    for _ in range(steps):
        loss = generator.loss_per_sample(latents, LABELS, noise, timesteps).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


def test_lora_trains_the_adapter_only_and_disables_to_the_base(generator):
    base = _predictions(generator)
    base_parameters = {n: p.detach().clone() for n, p in generator.unet.named_parameters()}
    generator.add_lora(lora.LoraSettings(rank=4, alpha=8.0))
    trainable = [n for n, p in generator.unet.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_" in n for n in trainable)
    assert len(generator.trainable_parameters()) == len(trainable)
    assert torch.equal(_predictions(generator), base)  # B = 0: the new adapter changes nothing
    _train_a_little(generator)
    tuned = _predictions(generator)
    assert not torch.allclose(tuned, base)
    for name, parameter in generator.unet.named_parameters():
        if ".lora_" not in name:
            assert torch.equal(parameter, base_parameters[name.replace(".base_layer", "")])
    latents, noise, timesteps = _inputs(generator)
    with torch.no_grad():
        assert torch.equal(generator.predict_noise(latents, LABELS, noise, timesteps, reference=True)[1], base)
        noisy = generator.noise_scheduler.add_noise(latents, noise, timesteps)
        assert torch.equal(generator.denoise(noisy, timesteps, LABELS, reference=True), base)
        policy = generator.denoise(noisy, timesteps, LABELS)
        assert torch.equal(policy, tuned)
    assert torch.equal(_predictions(generator), tuned)  # the adapter is back on


def test_full_finetuning_keeps_a_frozen_reference():
    generator = _pixel()
    base = _predictions(generator)
    generator.keep_reference()
    _train_a_little(generator)
    latents, noise, timesteps = _inputs(generator)
    with torch.no_grad():
        assert torch.equal(generator.predict_noise(latents, LABELS, noise, timesteps, reference=True)[1], base)
    assert not torch.allclose(_predictions(generator), base)


def test_lora_export_round_trip_and_merged_export(generator, tmp_path):
    generator.add_lora(lora.LoraSettings(rank=4, alpha=8.0))
    _train_a_little(generator)
    tuned, images = _predictions(generator), generator.sample(LABELS, SEEDS, 4, 0.5)

    loaded = load_generator(generator.save(tmp_path / "lora", {"model_id": "t"}))
    assert type(loaded) is type(generator) and loaded.has_lora and loaded.info["lora"]["r"] == 4
    assert torch.equal(_predictions(loaded), tuned)
    assert torch.equal(loaded.sample(LABELS, SEEDS, 4, 0.5), images)
    with torch.no_grad(), loaded.reference() as _:
        assert torch.equal(_predictions(loaded), _predictions(_base_of(generator)))

    merged_dir = generator.save(tmp_path / "merged", merged=True)
    assert not (merged_dir / lora.LORA_WEIGHT_NAME).exists()
    merged = load_generator(merged_dir)
    assert not merged.has_lora
    torch.testing.assert_close(_predictions(merged), tuned, atol=1e-5, rtol=1e-5)


def _base_of(generator):
    """The generator's base model as a separate adapter-free copy (tests only)."""
    copy = type(generator).__new__(type(generator))
    copy.__dict__.update(generator.__dict__)
    copy.unet = copy.denoiser = lora.plain_copy(generator.unet)
    return copy


def test_latent_lora_export_loads_in_plain_diffusers(tmp_path):
    from diffusers import AutoencoderKL, StableDiffusionPipeline

    generator = _latent()
    generator.add_lora(lora.LoraSettings(rank=4, alpha=8.0))
    _train_a_little(generator)
    tuned = _predictions(generator)
    model_dir = generator.save(tmp_path / "export")

    unet = UNet2DConditionModel.from_pretrained(model_dir, subfolder="unet")
    unet.load_lora_adapter(model_dir, prefix="unet", weight_name=lora.LORA_WEIGHT_NAME)
    latents, noise, timesteps = _inputs(generator)
    noisy = generator.noise_scheduler.add_noise(latents, noise, timesteps)
    with torch.no_grad():
        assert torch.equal(unet(noisy, timesteps, None, class_labels=LABELS).sample, tuned)

    pipe = StableDiffusionPipeline.from_pretrained(
        model_dir, text_encoder=None, tokenizer=None, safety_checker=None, feature_extractor=None, image_encoder=None
    )
    pipe.load_lora_weights(model_dir)
    scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    with torch.no_grad():
        torch.testing.assert_close(
            pipe.unet(noisy, timesteps, None, class_labels=LABELS).sample, tuned, atol=1e-5, rtol=1e-5
        )
        # plain diffusers' DDIM loop and VAE decode, one generator per seed
        sample = torch.stack(
            [torch.randn(generator.latent_shape, generator=torch.Generator().manual_seed(s)) for s in SEEDS]
        )
        scheduler.set_timesteps(4)
        for t in scheduler.timesteps:
            sample = scheduler.step(pipe.unet(sample, t, None, class_labels=LABELS).sample, t, sample).prev_sample
        vae: AutoencoderKL = pipe.vae
        images = vae.decode(sample / vae.config.scaling_factor).sample.clamp(-1, 1)
    torch.testing.assert_close(images, generator.sample(LABELS, SEEDS, 4), atol=1e-4, rtol=0)


def test_tiny_latent_trainer_and_latent_cache(tmp_path):
    from pathalign_ray.data import procedural

    data = procedural.generate(2, 16, seed=0, classes=CLASSES)
    generator = build_tiny_latent(LATENT, CLASSES, seed=0)
    history = train_tiny_latent(
        generator, data.images, data.labels, TinyTrainConfig(vae_steps=3, unet_steps=3, batch_size=4)
    )
    assert len(history["vae_loss"]) == 3 and len(history["unet_loss"]) == 3
    assert all(torch.isfinite(torch.tensor(history["unet_loss"])))
    latents = generator.encode_cached(data.images, tmp_path / "cache")
    assert latents.shape == (6, *generator.latent_shape)
    assert float(latents.std()) == pytest.approx(1.0, rel=1e-3)  # the scaling factor whitens the training latents
    assert len(list((tmp_path / "cache").iterdir())) == 1
    assert torch.equal(generator.encode_cached(data.images, tmp_path / "cache"), latents)  # read back, not re-encoded
    loaded = load_generator(generator.save(tmp_path / "model"))
    assert loaded.vae.config.scaling_factor == generator.vae.config.scaling_factor
    assert torch.equal(loaded.sample(LABELS, SEEDS, 3), generator.sample(LABELS, SEEDS, 3))


@pytest.mark.parametrize("objective", ["rwl", "ddpo"])
def test_a_lora_round_of_each_objective_on_the_latent_model(objective):
    """What finetune.py's steps will do through the interface: the adapter moves, the reference stays the base."""
    from pathalign_ray.generator.objectives import clipped_policy_loss, reward_weighted_loss

    generator = _latent()
    base = _predictions(generator)
    generator.add_lora(lora.LoraSettings(rank=4, alpha=8.0))
    optimizer = torch.optim.Adam(generator.trainable_parameters(), lr=3e-2)
    rewards = torch.tensor([1.0, 0.0, 0.5])
    if objective == "rwl":
        images = generator.decode(torch.randn(3, *generator.latent_shape, generator=torch.Generator().manual_seed(4)))
        latents = generator.encode(images)  # real or synthetic images, encoded once
        _, noise, timesteps = _inputs(generator, seed=6)
        losses = generator.loss_per_sample(latents, LABELS, noise, timesteps)
        with torch.no_grad():
            reference_losses = generator.loss_per_sample(latents, LABELS, noise, timesteps, reference=True)
        torch.testing.assert_close(losses.detach(), reference_losses)  # a new adapter is the base model
        loss, metrics = reward_weighted_loss(losses, rewards - rewards.mean(), losses, 0.3, reference_losses, 0.2)
        loss.backward()
        optimizer.step()
        assert metrics["loss_ratio_mean"] == pytest.approx(1.0)
    else:
        trajectory = generator.trajectories(LABELS, 3, 1.0, torch.Generator().manual_seed(7))
        for j, (t, prev_t) in enumerate(trajectory["timesteps"]):
            log_prob, output = generator.step_log_prob(
                trajectory["latents"][j], trajectory["latents"][j + 1], t, prev_t, LABELS, 1.0
            )
            with torch.no_grad():
                reference_output = generator.denoise(trajectory["latents"][j], t, LABELS, reference=True)
            loss, metrics = clipped_policy_loss(log_prob, trajectory["log_probs"][j], rewards - rewards.mean(), 1e-4)
            loss = loss + 0.1 * ((output - reference_output) ** 2).mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            if j == 0:  # before the first update the policy is the one that sampled: ratio 1
                assert metrics["clipfrac"] == 0.0 and metrics["approx_kl"] < 1e-10
    assert not torch.allclose(_predictions(generator), base)
    with torch.no_grad(), generator.reference():
        assert torch.equal(_predictions(generator), base)


def test_add_class_on_either_kind_keeps_the_old_classes_images_and_refuses_an_adapter(generator, tmp_path):
    """Algorithm 4 through the generator interface: the export has the concept last, its embedding the mean
    of init_from's, and draws exactly the old images for the old classes; a LoRA export must be merged first."""
    from pathalign_ray.generator.concepts import add_class

    base = generator.save(tmp_path / "base")
    extended = load_generator(add_class(base, "band_neutrophil", tmp_path / "extended", init_from=CLASSES[:2]))
    assert type(extended) is type(generator) and extended.class_names == [*CLASSES, "band_neutrophil"]
    rows = generator.unet.class_embedding.weight
    torch.testing.assert_close(extended.unet.class_embedding.weight[-1], rows[:2].mean(dim=0))
    assert torch.equal(extended.sample(LABELS, SEEDS, 3), generator.sample(LABELS, SEEDS, 3))
    assert extended.sample(torch.tensor([3]), SEEDS[:1], 3).shape[1:] == generator.sample(LABELS, SEEDS, 3).shape[1:]
    generator.add_lora(lora.LoraSettings(rank=4, alpha=8.0))
    with pytest.raises(ValueError, match="carries a LoRA adapter: add the class to its merged export"):
        add_class(generator.save(tmp_path / "adapter"), "band_neutrophil", tmp_path / "refused")
