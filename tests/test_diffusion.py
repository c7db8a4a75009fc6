import numpy as np
import pytest
import torch
from conftest import TINY_MODEL
from diffusers import DDIMScheduler

from pathalign_ray.generator.diffusion import (
    ModelConfig,
    build_noise_scheduler,
    ddim_sample,
    derive_seed,
    diffusion_loss_per_sample,
    export_model,
    load_model,
    to_model_input,
    to_uint8,
)


def test_loss_is_mse_of_predicted_noise(unet):
    scheduler = build_noise_scheduler(TINY_MODEL)
    images = torch.rand(2, 3, 16, 16) * 2 - 1
    noise = torch.randn(2, 3, 16, 16)
    labels, timesteps = torch.tensor([0, 2]), torch.tensor([5, 90])
    losses = diffusion_loss_per_sample(unet, scheduler, images, labels, noise, timesteps)
    alpha_bar = scheduler.alphas_cumprod[timesteps].view(-1, 1, 1, 1)
    noisy = alpha_bar.sqrt() * images + (1 - alpha_bar).sqrt() * noise
    with torch.no_grad():
        expected = ((unet(noisy, timesteps, class_labels=labels).sample - noise) ** 2).mean(dim=(1, 2, 3))
    assert losses.shape == (2,)
    torch.testing.assert_close(losses.detach(), expected)


def test_class_label_changes_the_prediction(unet):
    x = torch.randn(1, 3, 16, 16)
    t = torch.tensor([10])
    with torch.no_grad():
        a = unet(x, t, class_labels=torch.tensor([0])).sample
        b = unet(x, t, class_labels=torch.tensor([1])).sample
    assert not torch.allclose(a, b)


def test_seed_fixes_the_image_whatever_the_batch(unet):
    scheduler = DDIMScheduler.from_config(build_noise_scheduler(TINY_MODEL).config)
    seeds = [derive_seed(0, c, j) for c in range(2) for j in range(2)]
    labels = torch.tensor([0, 0, 1, 1])
    together = ddim_sample(unet, scheduler, labels, seeds, num_inference_steps=3, eta=0.5)
    alone = ddim_sample(unet, scheduler, labels[2:3], seeds[2:3], num_inference_steps=3, eta=0.5)
    torch.testing.assert_close(together[2:3], alone, atol=1e-5, rtol=1e-5)
    assert together.min() >= -1 and together.max() <= 1
    assert len(set(seeds)) == 4 and derive_seed(0, 1, 1) == seeds[3]


def test_uint8_round_trip():
    images = np.random.default_rng(0).integers(0, 256, (2, 8, 8, 3), dtype=np.uint8)
    np.testing.assert_array_equal(to_uint8(to_model_input(images)), images)


def test_export_loads_back(unet, tmp_path):
    scheduler = DDIMScheduler.from_config(build_noise_scheduler(TINY_MODEL).config)
    export_model(unet, scheduler, ["a", "b", "c"], tmp_path / "model", {"model_id": "m", "step": 3})
    loaded, scheduler, class_names, info = load_model(tmp_path / "model")
    assert class_names == ["a", "b", "c"] and info["step"] == 3
    assert isinstance(scheduler, DDIMScheduler)
    for name, tensor in unet.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[name], tensor)


def test_missing_model_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="not an exported model: unet/config.json is missing"):
        load_model(tmp_path)


def test_config_rules():
    with pytest.raises(ValueError, match="norm_num_groups 8 must divide"):
        ModelConfig(block_out_channels=(12, 24))
