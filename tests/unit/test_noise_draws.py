"""Noise multiplicity (``diffusion.noise_draws``): one draw is the plain DDPM loss bit for bit,
several are the mean of the per-draw losses computed in one forward pass, conditioning is tiled
with the images, and the config key is validated."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import tiny
from fedrun.config import load_config
from fedrun.errors import ConfigError
from fedrun.tasks.diffusion import DiffusionConfig, build_noise_scheduler, diffusion_loss, repeat_draws


@pytest.fixture(scope="module")
def unet_and_scheduler():
    from diffusers import UNet2DModel

    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16),
                       layers_per_block=1, down_block_types=("DownBlock2D", "DownBlock2D"),
                       up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=4)
    return unet.eval(), build_noise_scheduler(DiffusionConfig())


def _images(n=3, seed=1):
    return torch.rand(n, 1, 8, 8, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_one_draw_is_the_plain_ddpm_loss_bit_for_bit(unet_and_scheduler):
    unet, scheduler = unet_and_scheduler
    images = _images()
    generator = torch.Generator().manual_seed(7)
    noise = torch.randn(images.shape, generator=generator)
    timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (3,), generator=generator)
    with torch.no_grad():
        expected = F.mse_loss(unet(scheduler.add_noise(images, noise, timesteps), timesteps).sample, noise)
        got = diffusion_loss(unet, scheduler, images, torch.Generator().manual_seed(7), noise_draws=1)
        default = diffusion_loss(unet, scheduler, images, torch.Generator().manual_seed(7))
    assert torch.equal(got, expected) and torch.equal(default, expected)


@pytest.mark.parametrize("draws", [2, 4])
def test_several_draws_average_the_per_draw_losses(unet_and_scheduler, draws):
    unet, scheduler = unet_and_scheduler
    images, n = _images(), 3
    generator = torch.Generator().manual_seed(11)
    noise = torch.randn((draws * n, 1, 8, 8), generator=generator)
    timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (draws * n,), generator=generator)
    with torch.no_grad():
        per_draw = [F.mse_loss(unet(scheduler.add_noise(images, noise[d * n:(d + 1) * n],
                                                        timesteps[d * n:(d + 1) * n]),
                                    timesteps[d * n:(d + 1) * n]).sample, noise[d * n:(d + 1) * n])
                    for d in range(draws)]
        got = diffusion_loss(unet, scheduler, images, torch.Generator().manual_seed(11), noise_draws=draws)
    torch.testing.assert_close(got, torch.stack(per_draw).mean(), rtol=1e-5, atol=1e-7)


def test_draws_run_in_one_forward_of_the_tiled_batch(unet_and_scheduler):
    unet, scheduler = unet_and_scheduler
    batches = []
    hook = unet.register_forward_hook(lambda module, args, output: batches.append(args[0].shape[0]))
    try:
        with torch.no_grad():
            diffusion_loss(unet, scheduler, _images(3), torch.Generator().manual_seed(0), noise_draws=4)
    finally:
        hook.remove()
    assert batches == [12]


def test_the_draws_come_from_the_callers_generator(unet_and_scheduler):
    unet, scheduler = unet_and_scheduler
    with torch.no_grad():
        loss = lambda seed: diffusion_loss(unet, scheduler, _images(), torch.Generator().manual_seed(seed),  # noqa: E731
                                           noise_draws=3)
        assert torch.equal(loss(5), loss(5))
        assert not torch.equal(loss(5), loss(6))


def test_conditioning_tensors_are_tiled_with_the_images():
    images = torch.arange(2.0).view(2, 1, 1, 1)
    labels = torch.tensor([4, 7])
    context = torch.arange(12.0).view(2, 3, 2)
    tiled, conditioning = repeat_draws(images, {"class_labels": labels,
                                                "encoder_hidden_states": context, "flag": True}, 3)
    assert tiled.flatten().tolist() == [0, 1, 0, 1, 0, 1]
    assert conditioning["class_labels"].tolist() == [4, 7, 4, 7, 4, 7]
    assert torch.equal(conditioning["encoder_hidden_states"], context.repeat(3, 1, 1))
    assert conditioning["flag"] is True


def test_the_ddpm_task_trains_with_the_configured_draws(tmp_path):
    from fedrun.tasks.base import build_task

    cfg = load_config(None, tiny(tmp_path / "run", "diffusion.noise_draws=3"))
    task = build_task(cfg)
    built = task.build(torch.device("cpu"))
    batches = []
    built.model.register_forward_hook(lambda module, args, output: batches.append(args[0].shape[0]))
    loss = task.loss(built.model, np.arange(4), torch.Generator().manual_seed(0))
    assert batches == [12] and loss.ndim == 0 and torch.isfinite(loss)


def test_the_dit_task_tiles_the_class_labels_with_the_draws(tmp_path):
    from fedrun.tasks.base import build_task

    cfg = load_config(None, ["task.name=dit", "data.image_size=8", "data.max_samples=40",
                             "dit.num_layers=1", "dit.class_dropout=0", "dit.guidance_scale=1",
                             "diffusion.noise_draws=2",
                             f"output_dir={tmp_path / 'run'}"])
    task = build_task(cfg)
    built = task.build(torch.device("cpu"))
    seen = []
    built.model.register_forward_hook(
        lambda module, args, kwargs, output: seen.append((args[0].shape[0], kwargs["class_labels"])),
        with_kwargs=True)
    task.loss(built.model, np.arange(3), torch.Generator().manual_seed(0))
    labels = task.labels[:3]
    assert seen[0][0] == 6 and seen[0][1].tolist() == labels.repeat(2).tolist()


def test_noise_draws_below_one_are_refused_naming_the_key(tmp_path):
    with pytest.raises(ConfigError, match=r"config key 'diffusion.noise_draws': must be >= 1"):
        load_config(None, tiny(tmp_path / "run", "diffusion.noise_draws=0"))


def test_a_fine_tuning_config_refuses_noise_draws():
    # sd_lora has no 'diffusion' section: setting a draw count is refused, naming the tasks
    # that take it (its loss keeps one draw per image).
    with pytest.raises(ConfigError, match=r"config section 'diffusion' belongs to task"):
        load_config(None, ["task.name=sd_lora", "diffusion.noise_draws=2"])


def test_the_benchmarks_signal_statistics_against_hand_computation():
    from bench.noise_draws import signal_stats

    # two clients, two repeats; client 0's updates are clipped from norm 3 and 2 to 1
    first = torch.tensor([[3.0, 0.0], [0.0, 0.5]])
    second = torch.tensor([[2.0, 0.0], [0.0, -0.5]])
    stats = signal_stats([first, second], clip=1.0)
    assert stats["raw_norm_median"] == pytest.approx(1.75)
    assert stats["clipped_fraction"] == 0.5
    assert stats["self_cosine"] == pytest.approx(0.0)  # (1 + -1) / 2
    assert stats["cross_cosine"] == pytest.approx(0.0)
    assert stats["mean_norm"] == pytest.approx(0.3125 ** 0.5)  # |(0.5, 0.25)|
    assert stats["alignment"] == pytest.approx(0.3125 ** 0.5 / 0.75)
    assert stats["signal"] == pytest.approx(0.1875 ** 0.5)  # (0.5, 0.25) . (0.5, -0.25)


def test_the_benchmark_runs_quick(tmp_path):
    from bench.noise_draws import main

    threads = torch.get_num_threads()
    try:  # the benchmark runs on one thread
        result = main(["--quick", "--clients", "2", "--train-steps", "0", "--draws", "1", "2",
                       "--out", str(tmp_path / "result.json")])
    finally:
        torch.set_num_threads(threads)
    rows = result["states"][0]["rows"]
    assert [r["noise_draws"] for r in rows] == [1, 2] and rows[0]["signal_vs_first"] == 1.0
    assert (tmp_path / "result.json").is_file()
