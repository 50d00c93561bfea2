"""Tests for models.py: DiT configs and official layout, equivalence with DiT's published
maths, classifier-free guidance, checkpoint finding/loading, and the VAE helper.

Everything runs on the CPU with tiny configs and random weights; the full-size models are
only built on the meta device (layout checks, no memory, no forward pass).
"""
import math
import os
import socket
import subprocess
import sys
import urllib.error

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import models
from conftest import ROOT
from models import DiT, DiT_models, create_dit, find_model, load_teacher

TINY = dict(input_size=8, patch_size=2, in_channels=4, hidden_size=64, depth=2, num_heads=4, num_classes=10)


def tiny_dit(seed=0, **overrides):
    """A tiny DiT in eval mode whose zero-initialised layers (adaLN, output) are perturbed."""
    torch.manual_seed(seed)
    model = DiT(**{**TINY, **overrides}).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name != "pos_embed":
                p.add_(0.1 * torch.randn_like(p))
    return model


def random_state_dict(model, seed):
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(v.shape, generator=g) for k, v in model.state_dict().items()}


# ----------------------------------------------------------------------------- configs

# name -> (depth, hidden size, patch size, heads), from the DiT paper's Table 1.
EXPECTED_CONFIGS = {
    "DiT-XL/2": (28, 1152, 2, 16), "DiT-XL/4": (28, 1152, 4, 16), "DiT-XL/8": (28, 1152, 8, 16),
    "DiT-L/2": (24, 1024, 2, 16), "DiT-L/4": (24, 1024, 4, 16), "DiT-L/8": (24, 1024, 8, 16),
    "DiT-B/2": (12, 768, 2, 12), "DiT-B/4": (12, 768, 4, 12), "DiT-B/8": (12, 768, 8, 12),
    "DiT-S/2": (12, 384, 2, 6), "DiT-S/4": (12, 384, 4, 6), "DiT-S/8": (12, 384, 8, 6),
}


def test_model_table_has_exactly_the_12_configs():
    assert set(DiT_models) == set(EXPECTED_CONFIGS)


@pytest.mark.parametrize("name", sorted(EXPECTED_CONFIGS))
def test_every_config_builds_with_its_shape(name):
    depth, width, patch, heads = EXPECTED_CONFIGS[name]
    with torch.device("meta"):
        model = DiT_models[name](input_size=32)
    assert len(model.blocks) == depth
    assert model.pos_embed.shape == (1, (32 // patch) ** 2, width)
    assert model.patch_size == patch
    assert tuple(model.x_embedder.proj.weight.shape) == (width, 4, patch, patch)
    for block in model.blocks:
        assert block.attn.num_heads == heads
        assert block.attn.qkv.weight.shape == (3 * width, width)
        assert block.mlp.fc1.weight.shape == (4 * width, width)
    assert model.final_layer.linear.weight.shape == (patch * patch * 8, width)
    assert model.config["depth"] == depth and model.config["hidden_size"] == width
    assert model.config["patch_size"] == patch and model.config["num_heads"] == heads


# ----------------------------------------------------------------------------- official layout

def official_dit_xl2_layout(input_size):
    """Key -> shape of facebookresearch/DiT's DiT-XL-2-{256,512}x256.pt, written out by hand."""
    D, depth, p, in_ch, out_ch, classes = 1152, 28, 2, 4, 8, 1000
    layout = {
        "pos_embed": (1, (input_size // p) ** 2, D),
        "x_embedder.proj.weight": (D, in_ch, p, p),
        "x_embedder.proj.bias": (D,),
        "t_embedder.mlp.0.weight": (D, 256),
        "t_embedder.mlp.0.bias": (D,),
        "t_embedder.mlp.2.weight": (D, D),
        "t_embedder.mlp.2.bias": (D,),
        "y_embedder.embedding_table.weight": (classes + 1, D),
    }
    for i in range(depth):
        layout.update({
            f"blocks.{i}.attn.qkv.weight": (3 * D, D),
            f"blocks.{i}.attn.qkv.bias": (3 * D,),
            f"blocks.{i}.attn.proj.weight": (D, D),
            f"blocks.{i}.attn.proj.bias": (D,),
            f"blocks.{i}.mlp.fc1.weight": (4 * D, D),
            f"blocks.{i}.mlp.fc1.bias": (4 * D,),
            f"blocks.{i}.mlp.fc2.weight": (D, 4 * D),
            f"blocks.{i}.mlp.fc2.bias": (D,),
            f"blocks.{i}.adaLN_modulation.1.weight": (6 * D, D),
            f"blocks.{i}.adaLN_modulation.1.bias": (6 * D,),
        })
    layout.update({
        "final_layer.linear.weight": (p * p * out_ch, D),
        "final_layer.linear.bias": (p * p * out_ch,),
        "final_layer.adaLN_modulation.1.weight": (2 * D, D),
        "final_layer.adaLN_modulation.1.bias": (2 * D,),
    })
    return layout


@pytest.mark.parametrize("image_size,input_size,tokens", [(256, 32, 256), (512, 64, 1024)])
def test_dit_xl2_state_dict_is_the_official_layout(image_size, input_size, tokens):
    expected = official_dit_xl2_layout(input_size)
    assert len(expected) == 292
    assert expected["pos_embed"] == (1, tokens, 1152)
    with torch.device("meta"):
        by_table = DiT_models["DiT-XL/2"](input_size=input_size)
        by_size = create_dit("DiT-XL/2", image_size)
    for model in (by_table, by_size):
        state = model.state_dict()
        got = {k: tuple(v.shape) for k, v in state.items()}
        assert sorted(set(got) - set(expected)) == [], "keys the official checkpoint does not have"
        assert sorted(set(expected) - set(got)) == [], "official keys the model lacks"
        assert got == expected
        assert all(v.dtype == torch.float32 for v in state.values())


def test_official_layout_loads_strictly_on_meta():
    """A state dict with exactly the official keys/shapes goes through the strict loader."""
    with torch.device("meta"):
        model = DiT_models["DiT-XL/2"](input_size=32)
        fake = {k: torch.empty(shape) for k, shape in official_dit_xl2_layout(32).items()}
    models.load_state_dict_strict(model, fake)  # raises on any difference


# ----------------------------------------------------------------------------- reference maths

def reference_pos_embed(dim, grid):
    """MAE/DiT 2-D sin-cos embedding: first half encodes the column, second half the row;
    each half is [sin(pos * w), cos(pos * w)] with w_k = 10000^(-k / (dim/4))."""
    quarter = dim // 4
    omega = 1.0 / 10000 ** (np.arange(quarter, dtype=np.float64) / quarter)
    rows, cols = np.divmod(np.arange(grid * grid), grid)
    def enc(pos):
        out = pos[:, None].astype(np.float64) * omega[None]
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)
    return np.concatenate([enc(cols), enc(rows)], axis=1)


@pytest.mark.parametrize("dim,grid", [(64, 4), (1152, 16), (1152, 32)])
def test_sincos_pos_embed_matches_reference(dim, grid):
    got = models.sincos_pos_embed_2d(dim, grid)
    assert got.shape == (grid * grid, dim) and got.dtype == torch.float32
    want = torch.from_numpy(reference_pos_embed(dim, grid)).float()
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


def test_new_model_initialisation_is_dits():
    torch.manual_seed(0)
    model = DiT(**TINY)
    want = torch.from_numpy(reference_pos_embed(64, 4)).float()[None]
    torch.testing.assert_close(model.pos_embed.data, want, rtol=0, atol=1e-6)
    assert not model.pos_embed.requires_grad
    zero = [model.final_layer.linear, model.final_layer.adaLN_modulation[1]] + \
           [b.adaLN_modulation[1] for b in model.blocks]
    for layer in zero:
        assert not layer.weight.any() and not layer.bias.any()
    assert model.x_embedder.proj.weight.std() > 0 and not model.x_embedder.proj.bias.any()
    x = torch.randn(2, 4, 8, 8)
    out = model(x, torch.tensor([1, 500]), torch.tensor([0, 3]))
    assert out.shape == (2, 8, 8, 8) and not out.any()  # adaLN-Zero: output starts at exactly 0


def reference_timestep_embedding(t, dim, max_period=10000):
    """GLIDE/DiT: [cos(t f_k), sin(t f_k)], f_k = max_period^(-k/half), float64 then float32."""
    half = dim // 2
    freqs = np.exp(-math.log(max_period) * np.arange(half) / half)
    args = np.asarray(t, dtype=np.float64)[:, None] * freqs[None]
    return torch.from_numpy(np.concatenate([np.cos(args), np.sin(args)], axis=1)).float()


def test_timestep_embedding_is_cos_then_sin():
    t = torch.tensor([0, 1, 17, 500, 999])
    got = models.TimestepEmbedder.timestep_embedding(t, 256)
    assert got.shape == (5, 256)
    torch.testing.assert_close(got, reference_timestep_embedding(t.numpy(), 256), rtol=0, atol=2e-4)
    assert torch.equal(got[0], torch.cat([torch.ones(128), torch.zeros(128)]))
    odd = models.TimestepEmbedder.timestep_embedding(t, 7)
    assert odd.shape == (5, 7) and not odd[:, -1].any()


def reference_unpatchify(tokens, p, c):
    """Token (i, j) holds its p x p x c patch in (row, column, channel) order."""
    B, L, _ = tokens.shape
    h = int(math.isqrt(L))
    out = torch.empty(B, c, h * p, h * p)
    for i in range(h):
        for j in range(h):
            patch = tokens[:, i * h + j].reshape(B, p, p, c)
            out[:, :, i * p:(i + 1) * p, j * p:(j + 1) * p] = patch.permute(0, 3, 1, 2)
    return out


def reference_dit_forward(model, x, t, y):
    """DiT's forward written from the paper/official code's formulas, with timm's Attention
    and Mlp modules holding the same weights."""
    from timm.models.vision_transformer import Attention, Mlp

    sd = model.state_dict()
    cfg = model.config
    D, p, heads = cfg["hidden_size"], cfg["patch_size"], cfg["num_heads"]
    out_ch = cfg["in_channels"] * (2 if cfg["learn_sigma"] else 1)

    def modulate(h, shift, scale):
        return h * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)

    def layer_norm(h):
        return F.layer_norm(h, (D,), eps=1e-6)

    h = F.conv2d(x, sd["x_embedder.proj.weight"], sd["x_embedder.proj.bias"], stride=p)
    h = h.flatten(2).transpose(1, 2) + sd["pos_embed"]
    # DiT computes the frequency features in float32: same precision here.
    freqs = torch.exp(-math.log(10000) * torch.arange(128, dtype=torch.float32) / 128)
    args = t.float()[:, None] * freqs[None]
    t_freq = torch.cat([torch.cos(args), torch.sin(args)], dim=1)
    t_emb = F.linear(F.silu(F.linear(t_freq, sd["t_embedder.mlp.0.weight"], sd["t_embedder.mlp.0.bias"])),
                     sd["t_embedder.mlp.2.weight"], sd["t_embedder.mlp.2.bias"])
    c = t_emb + sd["y_embedder.embedding_table.weight"][y]
    for i in range(cfg["depth"]):
        pre = f"blocks.{i}."
        attn = Attention(D, num_heads=heads, qkv_bias=True)
        attn.load_state_dict({k[len(pre + "attn."):]: v for k, v in sd.items() if k.startswith(pre + "attn.")})
        mlp = Mlp(in_features=D, hidden_features=int(D * cfg["mlp_ratio"]),
                  act_layer=lambda: nn.GELU(approximate="tanh"), drop=0)
        mlp.load_state_dict({k[len(pre + "mlp."):]: v for k, v in sd.items() if k.startswith(pre + "mlp.")})
        mod = F.linear(F.silu(c), sd[pre + "adaLN_modulation.1.weight"], sd[pre + "adaLN_modulation.1.bias"])
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mod.chunk(6, dim=1)
        h = h + gate_msa.unsqueeze(1) * attn.eval()(modulate(layer_norm(h), shift_msa, scale_msa))
        h = h + gate_mlp.unsqueeze(1) * mlp.eval()(modulate(layer_norm(h), shift_mlp, scale_mlp))
    mod = F.linear(F.silu(c), sd["final_layer.adaLN_modulation.1.weight"], sd["final_layer.adaLN_modulation.1.bias"])
    shift, scale = mod.chunk(2, dim=1)
    tokens = F.linear(modulate(layer_norm(h), shift, scale), sd["final_layer.linear.weight"],
                      sd["final_layer.linear.bias"])
    return reference_unpatchify(tokens, p, out_ch)


@pytest.mark.parametrize("overrides", [{}, dict(patch_size=4, learn_sigma=False, depth=3),
                                       dict(in_channels=3, input_size=12, patch_size=3, hidden_size=48)])
def test_forward_equals_reference_implementation(overrides):
    model = tiny_dit(**overrides)
    cfg = model.config
    B = 4
    x = torch.randn(B, cfg["in_channels"], cfg["input_size"], cfg["input_size"])
    t = torch.tensor([0, 999, 500, 17])
    y = torch.tensor([0, 9, 3, 10])  # 10 is the null class
    with torch.no_grad():
        got = model(x, t, y)
        want = reference_dit_forward(model, x, t, y)
    assert got.shape == (B, cfg["in_channels"] * (2 if cfg["learn_sigma"] else 1), cfg["input_size"], cfg["input_size"])
    assert want.abs().mean() > 0.05, "the reference output is near zero: the test would be vacuous"
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    # Each sample depends on its own timestep and label.
    assert not torch.allclose(got[0], model(x[:1], t[1:2], y[:1])[0].detach(), atol=1e-4)


def test_forward_accepts_fractional_timesteps():
    model = tiny_dit()
    x = torch.randn(2, 4, 8, 8)
    t = torch.tensor([0.5, 731.25])
    y = torch.tensor([1, 2])
    with torch.no_grad():
        torch.testing.assert_close(model(x, t, y), reference_dit_forward(model, x, t, y), rtol=1e-6, atol=1e-6)


def test_label_dropout_uses_the_null_class_in_training_only():
    model = tiny_dit(class_dropout_prob=1.0)  # training always drops the label
    assert model.y_embedder.embedding_table.num_embeddings == 11
    x, t, y = torch.randn(3, 4, 8, 8), torch.tensor([5, 50, 500]), torch.tensor([1, 2, 3])
    with torch.no_grad():
        eval_out = model(x, t, y)
        null_out = model(x, t, torch.full_like(y, 10))
        train_out = model.train()(x, t, y)
    torch.testing.assert_close(train_out, null_out, rtol=0, atol=0)
    assert not torch.allclose(eval_out, null_out, atol=1e-4)
    assert DiT(**{**TINY, "class_dropout_prob": 0.0}).y_embedder.embedding_table.num_embeddings == 10


def test_grouped_conditioning_equals_per_group_modulation():
    """(B, S, D) conditioning modulates each of the S equal token groups with its own row."""
    x = torch.randn(2, 6, 5)
    shift, scale, g = torch.randn(2, 3, 5), torch.randn(2, 3, 5), torch.randn(2, 3, 5)
    got_m, got_g = models.modulate(x, shift, scale), models.gate(x, g)
    for s in range(3):
        part = x[:, 2 * s:2 * s + 2]
        torch.testing.assert_close(got_m[:, 2 * s:2 * s + 2], part * (1 + scale[:, s:s + 1]) + shift[:, s:s + 1])
        torch.testing.assert_close(got_g[:, 2 * s:2 * s + 2], part * g[:, s:s + 1])


# ----------------------------------------------------------------------------- guidance

def cfg_batch(model, B=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(B, model.in_channels, 8, 8, generator=g)
    x = torch.cat([z, z])
    t = torch.full((2 * B,), 321)
    y = torch.cat([torch.tensor([0, 4, 7][:B]), torch.full((B,), model.num_classes)])
    return x, t, y


def test_cfg_scale_one_is_the_conditional_half():
    model = tiny_dit()
    x, t, y = cfg_batch(model)
    with torch.no_grad():
        out = model(x, t, y)
        guided = model.forward_with_cfg(x, t, y, 1.0)
    assert guided.shape == out.shape
    torch.testing.assert_close(guided[:3], out[:3], rtol=1e-6, atol=1e-6)
    # Both halves of the guided batch carry the guided eps (DiT's convention).
    torch.testing.assert_close(guided[3:, :3], guided[:3, :3], rtol=0, atol=0)


@pytest.mark.parametrize("channels,guided", [(3, 3), (None, 4)])
def test_cfg_touches_only_the_guided_eps_channels(channels, guided):
    model = tiny_dit()
    x, t, y = cfg_batch(model)
    scale = 4.0
    with torch.no_grad():
        out = model(x, t, y)
        got = model.forward_with_cfg(x, t, y, scale, guidance_channels=channels) if channels is None \
            else model.forward_with_cfg(x, t, y, scale)
    cond, uncond = out[:3], out[3:]
    want = uncond[:, :guided] + scale * (cond[:, :guided] - uncond[:, :guided])
    torch.testing.assert_close(got[:3, :guided], want, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(got[3:, :guided], want, rtol=1e-6, atol=1e-6)
    # Channels past the guided ones (the 4th eps channel by default, the variance always) are untouched.
    assert torch.equal(got[:, guided:], out[:, guided:])
    assert not torch.allclose(got[:3, :guided], cond[:, :guided], atol=1e-3), "guidance had no effect"


def test_cfg_ignores_the_second_half_of_x():
    model = tiny_dit()
    x, t, y = cfg_batch(model)
    other = x.clone()
    other[3:] = torch.randn_like(other[3:])
    with torch.no_grad():
        assert torch.equal(model.forward_with_cfg(x, t, y, 2.5), model.forward_with_cfg(other, t, y, 2.5))


def test_cfg_on_pixel_model_guides_all_three_channels():
    model = tiny_dit(in_channels=3)
    x, t, y = cfg_batch(model)
    with torch.no_grad():
        out = model(x, t, y)
        got = model.forward_with_cfg(x, t, y, 3.0)
    torch.testing.assert_close(got[:3, :3], out[3:, :3] + 3.0 * (out[:3, :3] - out[3:, :3]), rtol=1e-6, atol=1e-6)
    assert torch.equal(got[:, 3:], out[:, 3:])


def test_with_guidance_wraps_the_model_for_a_sampler():
    model = tiny_dit()
    noise, y = torch.randn(2, 4, 8, 8), torch.tensor([3, 7])
    assert models.with_guidance(model, noise, y, 1.0) == (model, noise, y)  # scale 1: no doubling
    fn, z, labels = models.with_guidance(model, noise, y, 4.0)
    assert torch.equal(z, torch.cat([noise, noise])) and labels.tolist() == [3, 7, 10, 10]
    t = torch.full((4,), 600)
    with torch.no_grad():
        assert torch.equal(fn(z, t, labels), model.forward_with_cfg(z, t, labels, 4.0))
        fn_all, _, _ = models.with_guidance(model, noise, y, 4.0, guidance_channels=None)
        assert torch.equal(fn_all(z, t, labels), model.forward_with_cfg(z, t, labels, 4.0, guidance_channels=None))


@pytest.mark.parametrize("scale", [0.99, 0.0, -1.0])
def test_cfg_scale_below_one_is_rejected(scale):
    model = tiny_dit()
    x, t, y = cfg_batch(model)
    with pytest.raises(ValueError, match=r"(?i)cfg.*>= ?1"):
        model.forward_with_cfg(x, t, y, scale)


# ----------------------------------------------------------------------------- bad input

def test_unknown_model_name(tmp_path):
    with pytest.raises(ValueError, match=r"unknown model 'DiT-XXL/2'.*DiT-XL/2"):
        create_dit("DiT-XXL/2", 256)
    path = tmp_path / "weights.pt"
    torch.save(DiT(**TINY).state_dict(), path)
    with pytest.raises(ValueError, match=r"unknown model 'DiT-Q/2'"):
        load_teacher(str(path), model="DiT-Q/2", image_size=64)


def test_image_size_not_divisible_by_8():
    with pytest.raises(ValueError, match=r"image size 100 .*divisible by 8"):
        create_dit("DiT-S/2", 100)
    with torch.device("meta"):
        assert create_dit("DiT-S/8", 64).config["input_size"] == 8  # 64 px -> 8 latents, one patch
        assert create_dit("DiT-S/2", 12, latent=False).x_embedder.num_patches == 36  # pixels: no /8 rule


@pytest.mark.parametrize("kwargs", [dict(model="DiT-S/8", image_size=8 * 12),   # 12 latents, patch 8
                                    dict(model="DiT-S/4", image_size=10, latent=False)])
def test_image_size_not_divisible_by_patch(kwargs):
    with pytest.raises(ValueError, match=r"not divisible by the patch size"):
        create_dit(**kwargs)


def test_heads_must_divide_width():
    with pytest.raises(ValueError, match="heads"):
        DiT(**{**TINY, "num_heads": 5})


def test_mismatched_checkpoint_names_first_offending_keys(tmp_path):
    model = DiT(**TINY)
    state = model.state_dict()
    state["blocks.0.attn.qkv.weightt"] = state.pop("blocks.0.attn.qkv.weight")
    state["extra.bias"] = torch.zeros(3)
    state["pos_embed"] = torch.zeros(1, 64, 64)
    with pytest.raises(ValueError) as err:
        models.load_state_dict_strict(DiT(**TINY), state, source="ck.pt")
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith("ck.pt")
    assert "missing: blocks.0.attn.qkv.weight" in msg
    assert "unexpected: blocks.0.attn.qkv.weightt, extra.bias" in msg
    assert "pos_embed: (1, 64, 64) vs model (1, 16, 64)" in msg

    many_missing = {k: v for k, v in model.state_dict().items() if not k.startswith("blocks.1.")}
    with pytest.raises(ValueError, match=r"missing: blocks\.1\.attn\.qkv\.weight, blocks\.1\.attn\.qkv\.bias, "
                                         r"blocks\.1\.attn\.proj\.weight \(\+7 more\)"):
        models.load_state_dict_strict(DiT(**TINY), many_missing)

    # The same error through the file loaders, naming the file.
    path = tmp_path / "bad.pt"
    torch.save({"model": state, "ema": state, "opt": {}, "step": 1,
                "args": dict(stage="teacher", dit=model.config, image_size=8, vae="none")}, path)
    with pytest.raises(ValueError, match=rf"{path.name}.*missing: blocks\.0\.attn\.qkv\.weight"):
        load_teacher(str(path))


def test_missing_local_checkpoint(tmp_path):
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        find_model(str(tmp_path / "nope.pt"))


# ----------------------------------------------------------------------------- checkpoint finding

def assert_same_weights(model, state):
    own = model.state_dict()
    assert set(own) == set(state)
    for k, v in state.items():
        assert torch.equal(own[k], v), k


def test_bare_state_dict_loads_strictly_through_find_model(tmp_path):
    source = tiny_dit(seed=3)
    path = tmp_path / "weights.pt"
    torch.save(source.state_dict(), path)
    state = find_model(str(path))
    model = models.load_state_dict_strict(DiT(**TINY), state)
    assert_same_weights(model, source.state_dict())
    x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([3, 900]), torch.tensor([1, 2])
    with torch.no_grad():
        assert torch.equal(model.eval()(x, t, y), source(x, t, y))


@pytest.mark.parametrize("wrapper", [None, "ema", "model"])
def test_a_state_dict_loads_bare_or_wrapped(tmp_path, wrapper):
    source = tiny_dit(seed=3)
    path = tmp_path / "weights.pt"
    torch.save({wrapper: source.state_dict(), "epoch": 3} if wrapper else source.state_dict(), path)
    found = models.describe_checkpoint(str(path))
    assert (found.kind, found.settings, found.family) == ("state dict", {}, None)
    assert_same_weights(models.load_state_dict_strict(DiT(**TINY), found.state_dict), source.state_dict())


def test_an_unknown_file_stops_every_loader_with_one_line_naming_its_keys(tmp_path):
    import sample
    from ard import load_student
    path = tmp_path / "other.pt"
    torch.save({"state_dict": tiny_dit().state_dict(), "epoch": 3}, path)
    for load in (find_model, load_teacher, load_student, sample.load_generator):
        with pytest.raises(ValueError) as err:
            load(str(path))
        assert str(err.value) == (f"{path}: not a checkpoint we know (top-level keys state_dict, epoch); expected one "
                                  f"of ours, an export, or a DiT/SiT/REPA/REPA-E/LightningDiT state dict bare or under "
                                  f"'ema' or 'model'")


def test_safetensors_loads_strictly(tmp_path):
    from safetensors.torch import save_file

    source = tiny_dit(seed=4)
    path = tmp_path / "weights.safetensors"
    save_file(source.state_dict(), str(path))
    model = models.load_state_dict_strict(DiT(**TINY), find_model(str(path)))
    assert_same_weights(model, source.state_dict())


def training_checkpoint(config, model_state, ema_state, stage="teacher"):
    net = DiT(**config)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4)
    net(torch.randn(1, config["in_channels"], config["input_size"], config["input_size"]),
        torch.tensor([1]), torch.tensor([0])).square().mean().backward()
    opt.step()
    return {"model": model_state, "ema": ema_state, "opt": opt.state_dict(), "step": 1234,
            "args": dict(stage=stage, dit=config, image_size=config["input_size"], vae="none", lr=1e-4)}


def test_training_checkpoint_gives_its_ema(tmp_path):
    config = {**DiT(**TINY).config, "in_channels": 3}
    template = DiT(**config)
    model_state, ema_state = random_state_dict(template, 1), random_state_dict(template, 2)
    path = tmp_path / "0001234.pt"
    torch.save(training_checkpoint(config, model_state, ema_state), path)

    state = find_model(str(path))
    assert set(state) == set(ema_state) and all(torch.equal(state[k], ema_state[k]) for k in ema_state)

    net, info = load_teacher(str(path))
    assert not net.training
    assert_same_weights(net, ema_state)
    assert net.config == config
    assert info["dit"] == config and info["image_size"] == 8 and info["vae"] == "none"
    assert info["ckpt"] == str(path)


def test_non_teacher_training_checkpoint_is_refused(tmp_path):
    config = DiT(**TINY).config
    state = DiT(**config).state_dict()
    path = tmp_path / "ard.pt"
    torch.save(training_checkpoint(config, state, state, stage="ard"), path)
    with pytest.raises(ValueError, match="not a teacher"):
        load_teacher(str(path))


@pytest.fixture(scope="module")
def dit_s8_pixel_state():
    """A random DiT-S/8 state dict for 8x8 pixel images (the smallest table model: one patch)."""
    torch.manual_seed(5)
    model = create_dit("DiT-S/8", 8, latent=False, in_channels=3, num_classes=10)
    return random_state_dict(model, 6)


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_bare_state_dict_through_load_teacher(tmp_path, dit_s8_pixel_state, suffix):
    path = str(tmp_path / f"s8{suffix}")
    if suffix == ".pt":
        torch.save(dit_s8_pixel_state, path)
    else:
        from safetensors.torch import save_file
        save_file(dit_s8_pixel_state, path)
    net, info = load_teacher(path, model="DiT-S/8", image_size=8, vae="none", num_classes=10)
    assert_same_weights(net, dit_s8_pixel_state)
    assert info["image_size"] == 8 and info["vae"] == "none" and info["dit"]["in_channels"] == 3
    # The wrong architecture for the same file is a clear error.
    with pytest.raises(ValueError, match="shape mismatch"):
        load_teacher(path, model="DiT-S/8", image_size=16, vae="none", num_classes=10)


def test_official_name_offline_is_one_clear_line(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    calls = []

    def offline(url, dst, *args, **kwargs):
        calls.append((url, dst))
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    for load in (find_model, load_teacher):
        with pytest.raises(FileNotFoundError) as err:
            load("DiT-XL-2-256x256.pt")
        msg = str(err.value)
        assert "\n" not in msg
        assert "pretrained_models/DiT-XL-2-256x256.pt" in msg.replace("\\", "/")
        assert "https://dl.fbaipublicfiles.com/DiT/models/DiT-XL-2-256x256.pt" in msg
    assert calls[0][0] == "https://dl.fbaipublicfiles.com/DiT/models/DiT-XL-2-256x256.pt"
    assert not (tmp_path / "pretrained_models" / "DiT-XL-2-256x256.pt").exists()


def test_official_name_uses_the_cached_file(tmp_path, monkeypatch, dit_s8_pixel_state):
    monkeypatch.chdir(tmp_path)

    def no_download(*args, **kwargs):
        raise AssertionError("a cached official checkpoint must not be downloaded again")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_download)
    # A DiT-S/8 latent model at 256 px (32 latents): its state dict stands in for the real file.
    torch.manual_seed(7)
    state = random_state_dict(create_dit("DiT-S/8", 256), 8)
    (tmp_path / "pretrained_models").mkdir()
    torch.save(state, tmp_path / "pretrained_models" / "DiT-XL-2-256x256.pt")
    got = find_model("DiT-XL-2-256x256.pt")
    assert all(torch.equal(got[k], v) for k, v in state.items())
    # The official name fixes the resolution (256 -> 32 latents) whatever image_size says.
    net, info = load_teacher("DiT-XL-2-256x256.pt", model="DiT-S/8", image_size=512)
    assert info["image_size"] == 256 and net.config["input_size"] == 32 and info["vae"] == "ema"
    assert_same_weights(net, state)


def test_official_name_downloads_once(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    small = {"w": torch.arange(3.0)}
    calls = []

    def fake_download(url, dst, *args, **kwargs):
        calls.append(url)
        torch.save(small, dst)

    monkeypatch.setattr(torch.hub, "download_url_to_file", fake_download)
    for _ in range(2):
        assert torch.equal(find_model("DiT-XL-2-512x512.pt")["w"], small["w"])
    assert calls == ["https://dl.fbaipublicfiles.com/DiT/models/DiT-XL-2-512x512.pt"]


def launch_download_ranks(folder, log, *launch):
    """tests/download_ranks.py under torchrun (`launch`: its flags) in `folder`, its downloads logged to `log`."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                             "MASTER_PORT")}
    env.update(PYTHONPATH=ROOT, DOWNLOAD_LOG=str(log), CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", *launch, os.path.join(ROOT, "tests", "download_ranks.py")]
    return subprocess.Popen(cmd, cwd=folder, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finished(process):
    output, _ = process.communicate(timeout=300)
    assert process.returncode == 0, output[-3000:]


def test_two_ranks_download_an_official_checkpoint_once(tmp_path):
    log = tmp_path / "downloads.log"
    finished(launch_download_ranks(tmp_path, log, "--standalone", "--nproc_per_node=2"))
    assert log.read_text() == "0 https://dl.fbaipublicfiles.com/DiT/models/DiT-XL-2-256x256.pt\n"


def test_each_node_downloads_into_its_node_local_folder_once(tmp_path):
    """Two nodes of two ranks (two torchrun launches), a folder per node: rank 2, node 1's first, downloads after
    rank 0 into its own, and rank 3 waits for it (with one folder, rank 2 finds rank 0's file as rank 1 does)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log, nodes = tmp_path / "downloads.log", []
    for node in range(2):
        folder = tmp_path / f"node{node}"
        folder.mkdir()
        nodes.append(launch_download_ranks(folder, log, "--nnodes=2", f"--node_rank={node}", "--nproc_per_node=2",
                                           "--master_addr=127.0.0.1", f"--master_port={port}"))
    for process in nodes:
        finished(process)
    assert [line.split()[0] for line in log.read_text().splitlines()] == ["0", "2"]


# ----------------------------------------------------------------------------- autoencoder

@pytest.fixture(scope="module")
def tiny_vae():
    from diffusers.models import AutoencoderKL

    torch.manual_seed(0)
    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                         up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(32, 64),
                         layers_per_block=1, latent_channels=4, norm_num_groups=32, sample_size=16).eval()


def test_autoencoder_applies_the_sd_scale(tiny_vae):
    ae = models.Autoencoder(tiny_vae)
    images = torch.rand(2, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        mode = tiny_vae.encode(images).latent_dist.mode()
        latents = ae.encode(images, sample=False)
        torch.testing.assert_close(latents, mode * 0.18215, rtol=0, atol=0)
        decoded = ae.decode(latents)
        torch.testing.assert_close(decoded, tiny_vae.decode(latents / 0.18215).sample, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(decoded, tiny_vae.decode(mode).sample, rtol=1e-5, atol=1e-5)
    assert latents.shape == (2, 4, 8, 8) and decoded.shape == images.shape
    # sample=True draws from the posterior, then scales: (z / 0.18215 - mean) / std is standard normal.
    torch.manual_seed(1)
    sampled = ae.encode(images)
    with torch.no_grad():
        std = tiny_vae.encode(images).latent_dist.std
    z = (sampled / 0.18215 - mode) / std
    assert sampled.shape == latents.shape
    assert abs(z.mean().item()) < 0.15 and 0.85 < z.std().item() < 1.15


def test_load_autoencoder_from_a_local_folder(tiny_vae, tmp_path):
    tiny_vae.save_pretrained(str(tmp_path / "vae"))
    ae = models.load_autoencoder(str(tmp_path / "vae"))
    assert isinstance(ae, models.Autoencoder) and not ae.vae.training
    images = torch.rand(1, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        torch.testing.assert_close(ae.encode(images, sample=False),
                                   models.Autoencoder(tiny_vae).encode(images, sample=False))
        z = torch.randn(1, 4, 8, 8)
        torch.testing.assert_close(ae.decode(z), models.Autoencoder(tiny_vae).decode(z))


def test_pixel_space_autoencoder_is_the_identity():
    ae = models.load_autoencoder("none")
    x = torch.randn(2, 3, 8, 8)
    assert torch.equal(ae.encode(x), x)
    assert torch.equal(ae.decode(x), x)
    assert torch.equal(ae.encode(x, sample=False), x)


@pytest.mark.filterwarnings("ignore::UserWarning")  # huggingface_hub's deprecation chatter on the way to the error
def test_sd_vae_offline_is_a_clear_error(monkeypatch, tmp_path):
    import huggingface_hub.constants as hf_constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # huggingface_hub reads the variable at import time (timm imports it early): set the flag too,
    # and point the cache at an empty folder so a machine that has the VAE cached behaves the same.
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(FileNotFoundError) as err:
        models.load_autoencoder("ema")
    msg = str(err.value)
    assert "\n" not in msg and "stabilityai/sd-vae-ft-ema" in msg and "save_pretrained" in msg
