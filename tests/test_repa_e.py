"""REPA-E's SiT-XL/1 (REPA-E/sit-ldm-e2e-vavae) as a teacher: REPA's SiT at patch 1 on VA-VAE latents (its layout
built here, tiny and random, in REPA's training dict), projectors and batch-norm buffers dropped and named, guided on
all channels inside its interval."""
import argparse
import logging

import torch

import test_vavae as tv
from models import create_dit, load_teacher
from sample import flow_generator
from test_vavae import va_vae  # noqa: F401 (a fixture)

SIZE = 8  # pixels: 4x4 latents of the tiny VA-VAE (downsampling 2), 16 tokens at patch 1


def repa_e_checkpoint(path, seed=0, num_classes=10):
    """REPA's training dict {"model", "ema", "opt", "args"} holding SiT at patch 1 with one projector MLP and REPA-E's
    latent batch norm (affine-free: running mean, variance and count)."""
    dit = create_dit("DiT-S/2", SIZE, downsampling=2, patch_size=1, in_channels=tv.Z, num_classes=num_classes,
                     learn_sigma=False)
    g = torch.Generator().manual_seed(seed)
    state = {k: v if k == "pos_embed" else 0.05 * torch.randn(v.shape, generator=g)
             for k, v in dit.state_dict().items()}
    extra = {"projectors.0.0.weight": torch.randn(16, 384, generator=g), "projectors.0.0.bias": torch.zeros(16),
             "bn.running_mean": torch.zeros(tv.Z), "bn.running_var": torch.ones(tv.Z),
             "bn.num_batches_tracked": torch.tensor(0)}
    torch.save({"model": {}, "ema": {**state, **extra}, "opt": {}, "args": argparse.Namespace(model="SiT-XL/1")}, path)
    return state


def test_repa_e_loads_at_patch_one_with_its_training_tensors_named(tmp_path, va_vae, caplog):
    state = repa_e_checkpoint(tmp_path / "0400000.pt")
    with caplog.at_level(logging.WARNING):
        net, info = load_teacher(str(tmp_path / "0400000.pt"), "DiT-S/2", SIZE, va_vae, num_classes=10,
                                 family="flow")
    assert "REPA-E checkpoint; dropping its 2 projector tensors and its 3 batch-norm tensors, unused in sampling: " \
           "projectors.0.0.bias, projectors.0.0.weight, bn.num_batches_tracked, bn.running_mean, bn.running_var" \
           in caplog.text
    assert (info["time_convention"], info["dit"]["patch_size"], info["dit"]["in_channels"]) == ("repa", 1, tv.Z)
    assert all(torch.equal(net.state_dict()[k], v) for k, v in state.items())


def repa_euler(net, noise, y, steps, cfg_scale, low, high):
    """REPA's euler_sampler, directly: t from 1 to 0 in `steps` steps, all channels guided where low <= t <= high."""
    t = torch.linspace(1, 0, steps + 1, dtype=torch.float64)
    x = noise.double()
    for t_now, t_next in zip(t[:-1], t[1:]):
        time = torch.full((len(x),), float(t_now))
        v = net(x.float(), time, y).double()
        if low <= t_now <= high:
            v = net(x.float(), time, torch.full_like(y, 10)).double() * (1 - cfg_scale) + cfg_scale * v
        x = x + (t_next - t_now) * v
    return x


def test_repa_e_guides_every_channel_inside_its_interval(tmp_path, va_vae):
    repa_e_checkpoint(tmp_path / "0400000.pt", seed=1)
    net, _ = load_teacher(str(tmp_path / "0400000.pt"), "DiT-S/2", SIZE, va_vae, num_classes=10, family="flow")
    noise, y = torch.randn(2, tv.Z, 4, 4, dtype=torch.float64), torch.tensor([1, 7])
    generate = flow_generator(net, "repa", "euler", 8, 2.5, guidance_channels=None, guidance_interval=(0.0, 0.75))
    with torch.no_grad():
        reference = repa_euler(net, noise, y, 8, 2.5, 0.0, 0.75)
        torch.testing.assert_close(generate(noise, y), reference, rtol=0, atol=1e-5)
        assert (repa_euler(net, noise, y, 8, 2.5, 0.0, 1.0) - reference).abs().max() > 1e-4
