"""VA-VAE in diffusers' AutoencoderKL: the LDM layout's keys mapped, against an LDM-style reference of the same tiny
random weights; the per-channel latent statistics (both files' formats) and their round trip through --vae."""
import logging

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import vavae
from models import create_dit, latent_geometry, load_autoencoder, load_teacher

CH, CH_MULT, BLOCKS, Z = 32, (1, 2), 1, 8  # two levels: downsampling 2, attention at the lower resolution


def group_norm(channels):
    return nn.GroupNorm(32, channels, eps=1e-6)


class ResnetBlock(nn.Module):
    def __init__(self, cin, cout):
        super().__init__()
        self.norm1, self.conv1 = group_norm(cin), nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2, self.conv2 = group_norm(cout), nn.Conv2d(cout, cout, 3, padding=1)
        if cin != cout:
            self.nin_shortcut = nn.Conv2d(cin, cout, 1)

    def forward(self, x):
        h = self.conv2(F.silu(self.norm2(self.conv1(F.silu(self.norm1(x))))))
        return (self.nin_shortcut(x) if hasattr(self, "nin_shortcut") else x) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over the pixels, 1x1 convolutions for q, k, v and the output, residual."""

    def __init__(self, c):
        super().__init__()
        self.norm = group_norm(c)
        self.q, self.k, self.v, self.proj_out = (nn.Conv2d(c, c, 1) for _ in range(4))

    def forward(self, x):
        h = self.norm(x)
        b, c, hh, ww = x.shape
        q, k, v = (f(h).flatten(2).transpose(1, 2) for f in (self.q, self.k, self.v))
        weights = torch.softmax(q @ k.transpose(1, 2) / c ** 0.5, dim=-1)
        return x + self.proj_out((weights @ v).transpose(1, 2).reshape(b, c, hh, ww))


def level(blocks, attend):
    m = nn.Module()
    m.block = nn.ModuleList(blocks)
    m.attn = nn.ModuleList(AttnBlock(b.conv2.out_channels) for b in blocks) if attend else nn.ModuleList()
    return m


class LDMAutoencoder(nn.Module):
    """The LDM autoencoder from its description: levels of resnet blocks (attention after each at the lowest
    resolution), a strided convolution after a right/bottom zero pad between encoder levels, nearest upsampling and a
    convolution between decoder levels, a middle of resnet-attention-resnet, GroupNorm-SiLU-conv at the ends."""

    def __init__(self):
        super().__init__()
        widths, last = [CH * m for m in CH_MULT], len(CH_MULT) - 1
        self.encoder, self.decoder = nn.Module(), nn.Module()
        e, d = self.encoder, self.decoder
        e.conv_in, e.down, cin = nn.Conv2d(3, CH, 3, padding=1), nn.ModuleList(), CH
        for i, w in enumerate(widths):
            e.down.append(level([ResnetBlock(cin if j == 0 else w, w) for j in range(BLOCKS)], i == last))
            cin = w
            if i < last:
                e.down[i].downsample = nn.Module()
                e.down[i].downsample.conv = nn.Conv2d(w, w, 3, stride=2)
        for part in (e, d):
            part.mid = nn.Module()
            part.mid.block_1, part.mid.attn_1, part.mid.block_2 = ResnetBlock(cin, cin), AttnBlock(cin), \
                ResnetBlock(cin, cin)
        e.norm_out, e.conv_out = group_norm(cin), nn.Conv2d(cin, 2 * Z, 3, padding=1)
        self.quant_conv, self.post_quant_conv = nn.Conv2d(2 * Z, 2 * Z, 1), nn.Conv2d(Z, Z, 1)
        d.conv_in, d.up = nn.Conv2d(Z, cin, 3, padding=1), nn.ModuleList([None] * len(widths))
        for i in reversed(range(len(widths))):
            d.up[i] = level([ResnetBlock(cin if j == 0 else widths[i], widths[i]) for j in range(BLOCKS + 1)],
                            i == last)
            cin = widths[i]
            if i > 0:
                d.up[i].upsample = nn.Module()
                d.up[i].upsample.conv = nn.Conv2d(cin, cin, 3, padding=1)
        d.norm_out, d.conv_out = group_norm(cin), nn.Conv2d(cin, 3, 3, padding=1)

    @staticmethod
    def run_level(lvl, h):
        for j, block in enumerate(lvl.block):
            h = block(h)
            h = lvl.attn[j](h) if len(lvl.attn) else h
        return h

    @staticmethod
    def middle(part, h):
        return part.mid.block_2(part.mid.attn_1(part.mid.block_1(h)))

    def moments(self, x):
        e, h = self.encoder, self.encoder.conv_in(x)
        for lvl in e.down:
            h = self.run_level(lvl, h)
            h = lvl.downsample.conv(F.pad(h, (0, 1, 0, 1))) if hasattr(lvl, "downsample") else h
        return self.quant_conv(e.conv_out(F.silu(e.norm_out(self.middle(e, h)))))

    def decode(self, z):
        d = self.decoder
        h = self.middle(d, d.conv_in(self.post_quant_conv(z)))
        for i in reversed(range(len(d.up))):
            h = self.run_level(d.up[i], h)
            h = d.up[i].upsample.conv(F.interpolate(h, scale_factor=2.0, mode="nearest")) if i > 0 else h
        return d.conv_out(F.silu(d.norm_out(h)))


def random_ldm():
    torch.manual_seed(0)
    model = LDMAutoencoder().eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(0.2 * torch.randn_like(p))
    return model


def save_official(tmp_path, model, wrapped=True):
    state = model.state_dict()
    path = tmp_path / "vavae.pt"
    torch.save({"state_dict": {**state, "loss.logvar": torch.zeros(())}} if wrapped else state, path)
    return path


def save_stats(tmp_path, mean, std, repa_e=False):
    path = tmp_path / ("e2e-vavae-latents-stats.pt" if repa_e else "latents_stats.pt")
    shape = (1, -1, 1, 1)
    torch.save(dict(latents_bias=mean.view(shape), latents_scale=1 / std.view(shape)) if repa_e else
               dict(mean=mean.view(shape), std=std.view(shape)), path)
    return path


@pytest.fixture
def va_vae(tmp_path):
    """A converted VA-VAE folder (tiny, random; identity statistics) for --vae."""
    folder = str(tmp_path / "vavae")
    vavae.main(["--ckpt", str(save_official(tmp_path, random_ldm())),
                "--stats", str(save_stats(tmp_path, torch.zeros(Z), torch.ones(Z))), "--out", folder])
    return folder


@pytest.fixture
def ldm_files(tmp_path):
    model = random_ldm()
    mean, std = torch.randn(Z), torch.rand(Z) + 0.5
    return model, save_official(tmp_path, model), save_stats(tmp_path, mean, std), (mean, std)


def test_autoencoderkl_with_mapped_weights_is_the_ldm_autoencoder(ldm_files, caplog):
    reference, ckpt, stats, _ = ldm_files
    with caplog.at_level(logging.WARNING):
        vae = vavae.load_ldm_autoencoder(ckpt, stats)
    assert "dropping 1 tensors that are not the autoencoder's: loss.logvar" in caplog.text
    assert vae.config.down_block_types == ("DownEncoderBlock2D", "AttnDownEncoderBlock2D")
    assert vae.config.up_block_types == ("AttnUpDecoderBlock2D", "UpDecoderBlock2D")
    images, z = torch.rand(2, 3, 16, 16) * 2 - 1, torch.randn(2, Z, 8, 8)
    with torch.no_grad():
        mean, logvar = vae.encode(images).latent_dist.mean, vae.encode(images).latent_dist.logvar
        torch.testing.assert_close(torch.cat([mean, logvar], 1), reference.moments(images), rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(vae.decode(z).sample, reference.decode(z), rtol=1e-4, atol=1e-4)


def test_bare_and_repa_e_files_give_the_same_autoencoder(ldm_files, tmp_path):
    reference, ckpt, stats, (mean, std) = ldm_files
    bare = tmp_path / "bare"
    bare.mkdir()
    repa_e = vavae.load_ldm_autoencoder(save_official(bare, reference, wrapped=False),
                                        save_stats(bare, mean, std, repa_e=True))
    lightning = vavae.load_ldm_autoencoder(ckpt, stats)
    assert repa_e.config.latents_mean == lightning.config.latents_mean
    torch.testing.assert_close(torch.tensor(repa_e.config.latents_std), torch.tensor(lightning.config.latents_std))
    assert all(torch.equal(a, b) for a, b in zip(repa_e.state_dict().values(), lightning.state_dict().values()))


def test_per_channel_statistics_round_trip_through_a_converted_folder(ldm_files, tmp_path):
    _, ckpt, stats, (mean, std) = ldm_files
    folder = str(tmp_path / "vavae-diffusers")
    vavae.main(["--ckpt", str(ckpt), "--stats", str(stats), "--out", folder])
    assert latent_geometry(folder) == (Z, 2) and latent_geometry("ema") == (4, 8)
    autoencoder = load_autoencoder(folder)
    assert (autoencoder.latent_norm, autoencoder.scale_factor) == ("per-channel", 1.0)
    images = torch.rand(2, 3, 16, 16) * 2 - 1
    shape = (1, -1, 1, 1)
    raw = autoencoder.vae.encode(images).latent_dist.mode()
    latents = autoencoder.encode(images, sample=False)
    torch.testing.assert_close(latents, (raw - mean.view(shape)) / std.view(shape))
    with torch.no_grad():
        torch.testing.assert_close(autoencoder.decode(latents), autoencoder.vae.decode(raw).sample, rtol=1e-4,
                                   atol=1e-4)


def test_a_dit_teacher_on_va_vae_latents_takes_their_channels_and_downsampling(va_vae, tmp_path):
    folder = va_vae
    dit = create_dit("DiT-S/8", 32, downsampling=2, in_channels=Z, learn_sigma=False)
    torch.save(dit.state_dict(), tmp_path / "teacher.pt")
    teacher, info = load_teacher(str(tmp_path / "teacher.pt"), "DiT-S/8", 32, folder, family="flow",
                                 time_convention="repa")
    assert (teacher.in_channels, teacher.x_embedder.grid_size) == (Z, (2, 2))


def test_statistics_that_do_not_fit_stop_with_what_was_found(ldm_files, tmp_path):
    _, ckpt, _, _ = ldm_files
    with pytest.raises(ValueError, match=f"holds statistics of 3 channels, the autoencoder .* has {Z}"):
        vavae.load_ldm_autoencoder(ckpt, save_stats(tmp_path, torch.zeros(3), torch.ones(3)))
    torch.save({"scale": torch.ones(Z)}, tmp_path / "odd.pt")
    with pytest.raises(ValueError, match="expected latent statistics as mean and std .* found scale"):
        vavae.read_latent_stats(tmp_path / "odd.pt")
