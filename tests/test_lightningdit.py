"""LightningDiT as a teacher: its official layout (built here, tiny and random) loads strictly bare and under "ema";
its forward equals a reference written from the description of its block; its sampler equals the official
inference's Euler solve on the shifted grid with 3-channel guidance and its interval, solved directly in float64."""
import math

import pytest
import torch
import torch.nn.functional as F

import lightningdit
import test_vavae as tv
from ard import ARD
from models import load_teacher
from test_vavae import va_vae  # noqa: F401 (a fixture)
from sample import flow_generator
from transport import CONVENTIONS, GuidedVelocity, solve_progressive, time_grid

SIZE, PATCH, CHANNELS, HIDDEN, DEPTH, HEADS, CLASSES = 4, 1, tv.Z, 48, 2, 2, 10  # head size 24: 6 pairs per axis


def random_official_state(seed=0):
    """The official file's keys and shapes (feat_rope tables included) with random weights."""
    model = lightningdit.LightningDiT(input_size=SIZE, patch_size=PATCH, in_channels=CHANNELS, hidden_size=HIDDEN,
                                      depth=DEPTH, num_heads=HEADS, num_classes=CLASSES)
    g = torch.Generator().manual_seed(seed)
    return {k: v if k.startswith(("feat_rope.", "pos_embed")) else 0.3 * torch.randn(v.shape, generator=g)
            for k, v in model.state_dict().items()}


# ---------------------------------------------------------------------------- the reference, from the description

def rms_norm(x, weight):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * weight


def rotary(x, grid):
    """EVA's 2-D rotary embedding through complex numbers: in a head of d channels, pair i < d/4 of the first half
    turns by row·f_i, pair i of the second half by column·f_i, f_i = 10000^(-4i/d)."""
    d = x.shape[-1]
    freqs = 10000.0 ** (-torch.arange(d // 4, dtype=torch.float64) * 4 / d)
    rows, cols = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")
    angles = torch.cat([rows.reshape(-1, 1) * freqs, cols.reshape(-1, 1) * freqs], dim=-1)  # (L, d/2)
    turned = torch.view_as_complex(x.double().unflatten(-1, (-1, 2)).contiguous()) * torch.polar(
        torch.ones_like(angles), angles)
    return torch.view_as_real(turned).flatten(-2).to(x.dtype)


def reference_forward(state, x, t, y):
    """LightningDiT's forward from its description, on an official state dict."""
    def linear(h, name):
        return F.linear(h, state[f"{name}.weight"], state[f"{name}.bias"])
    grid = SIZE // PATCH
    h = F.conv2d(x, state["x_embedder.proj.weight"], state["x_embedder.proj.bias"], stride=PATCH)
    h = h.flatten(2).transpose(1, 2) + state["pos_embed"]
    half = 128
    freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32) / half)
    args = t[:, None].float() * freqs[None]
    temb = linear(F.silu(linear(torch.cat([args.cos(), args.sin()], -1), "t_embedder.mlp.0")), "t_embedder.mlp.2")
    c = F.silu(temb + state["y_embedder.embedding_table.weight"][y])
    B, N, D = h.shape
    for i in range(DEPTH):
        b = f"blocks.{i}"
        shift1, scale1, gate1, shift2, scale2, gate2 = linear(c, f"{b}.adaLN_modulation.1")[:, None].chunk(6, -1)
        a = rms_norm(h, state[f"{b}.norm1.weight"]) * (1 + scale1) + shift1
        q, k, v = linear(a, f"{b}.attn.qkv").view(B, N, 3, HEADS, D // HEADS).permute(2, 0, 3, 1, 4)
        q, k = rotary(q, grid), rotary(k, grid)
        weights = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(D // HEADS), dim=-1)
        h = h + gate1 * linear((weights @ v).transpose(1, 2).reshape(B, N, D), f"{b}.attn.proj")
        m = rms_norm(h, state[f"{b}.norm2.weight"]) * (1 + scale2) + shift2
        u, g = linear(m, f"{b}.mlp.w12").chunk(2, -1)
        h = h + gate2 * linear(F.silu(u) * g, f"{b}.mlp.w3")
    shift, scale = linear(c, "final_layer.adaLN_modulation.1")[:, None].chunk(2, -1)
    out = linear(rms_norm(h, state["final_layer.norm_final.weight"]) * (1 + scale) + shift, "final_layer.linear")
    return out.view(B, grid, grid, PATCH, PATCH, CHANNELS).permute(0, 5, 1, 3, 2, 4).reshape(B, CHANNELS, SIZE, SIZE)


# ---------------------------------------------------------------------------- loading

@pytest.mark.parametrize("wrapped", [False, True])
def test_official_file_loads_strictly_bare_and_under_ema(tmp_path, va_vae, wrapped):
    state = random_official_state()
    path = tmp_path / "lightningdit.pt"
    torch.save({"ema": state, "opt": {}} if wrapped else state, path)
    net, info = load_teacher(str(path), vae=va_vae, family="flow")
    assert (info["teacher_family"], info["time_convention"], info["dit"]["arch"]) == ("flow", "sit", "lightningdit")
    assert info["image_size"] == SIZE * 2  # the tiny VA-VAE downsamples by 2
    assert all(torch.equal(net.state_dict()[k], v) for k, v in state.items())


def test_forward_is_the_described_block(tmp_path, va_vae):
    state = random_official_state(1)
    torch.save(state, tmp_path / "lightningdit.pt")
    net, _ = load_teacher(str(tmp_path / "lightningdit.pt"), vae=va_vae, family="flow")
    x, t, y = torch.randn(3, CHANNELS, SIZE, SIZE), torch.tensor([0.1, 0.5, 0.9]), torch.tensor([0, 3, CLASSES])
    with torch.no_grad():
        torch.testing.assert_close(net(x, t, y), reference_forward(state, x, t, y), rtol=1e-4, atol=1e-4)


def test_what_the_official_model_cannot_do_stops(tmp_path, va_vae):
    net = lightningdit.LightningDiT(input_size=SIZE, in_channels=CHANNELS, hidden_size=HIDDEN, depth=1,
                                    num_heads=HEADS, num_classes=CLASSES)
    with pytest.raises(ValueError, match="takes 4x4 inputs .* square grid\\), got 4x2"):
        net(torch.randn(1, CHANNELS, SIZE, 2), torch.zeros(1), torch.zeros(1, dtype=torch.long))
    with pytest.raises(ValueError, match="6 tokens are not whole stages of the 16-token square grid"):
        net.blocks[0].attn.position(torch.randn(1, HEADS, 6, HIDDEN // HEADS))
    state = random_official_state()
    state["feat_rope.freqs_cos"] = state["feat_rope.freqs_cos"].roll(1, 0)
    torch.save(state, tmp_path / "other-grid.pt")
    with pytest.raises(ValueError, match="rotary tables loaded .* not those of a 4x4 grid with head size 24"):
        load_teacher(str(tmp_path / "other-grid.pt"), vae=va_vae, family="flow")
    with pytest.raises(ValueError, match="a LightningDiT on 8-channel latents; --vae none has 3"):
        load_teacher(str(tmp_path / "other-grid.pt"), vae="none", family="flow")


# ---------------------------------------------------------------------------- the official sampler

def official_solve(net, noise, y, cfg_scale, cfg_interval_start, timestep_shift, num_steps):
    """LightningDiT's inference, directly in float64: Euler in data-at-1 time t on linspace(0, 1, num_steps) shifted
    by s·t / (1 + (s - 1)·t), the network's velocity guided on its first 3 channels unless t < cfg_interval_start."""
    t = torch.linspace(0, 1, num_steps, dtype=torch.float64)
    t = timestep_shift * t / (1 + (timestep_shift - 1) * t)
    x, null = noise.double(), torch.full_like(y, CLASSES)
    for t_now, t_next in zip(t[:-1], t[1:]):
        time = torch.full((len(x),), float(t_now))
        cond, uncond = net(x.float(), time, y).double(), net(x.float(), time, null).double()
        velocity = cond.clone()
        if t_now >= cfg_interval_start:
            velocity[:, :3] = uncond[:, :3] + cfg_scale * (cond[:, :3] - uncond[:, :3])
        x = x + (t_next - t_now) * velocity
    return x


def test_sampler_is_the_official_inference(tmp_path, va_vae):
    torch.save(random_official_state(2), tmp_path / "lightningdit.pt")
    net, _ = load_teacher(str(tmp_path / "lightningdit.pt"), vae=va_vae, family="flow")
    noise, y = torch.randn(3, CHANNELS, SIZE, SIZE, dtype=torch.float64), torch.tensor([0, 4, 9])
    official = dict(cfg_scale=4.0, cfg_interval_start=0.3, timestep_shift=0.3, num_steps=9)
    settings = lightningdit.flow_settings(official["cfg_interval_start"], official["timestep_shift"],
                                          official["num_steps"])
    assert (settings["steps"], settings["guidance_interval"]) == (8, (0.0, 0.7))
    ours = flow_generator(net, settings["time_convention"], settings["solver"], settings["steps"],
                          official["cfg_scale"], settings["guidance_channels"], settings["guidance_interval"],
                          settings["time_shift"])
    with torch.no_grad():
        reference = official_solve(net, noise, y, **official)
        torch.testing.assert_close(ours(noise, y), reference, rtol=0, atol=1e-5)
        guided_everywhere = dict(official, cfg_interval_start=0.0)
        assert (official_solve(net, noise, y, **guided_everywhere) - reference).abs().max() > 1e-3


# ---------------------------------------------------------------------------- ARD students of LightningDiT

def student_of(history_layers, times, **kwargs):
    teacher = lightningdit.LightningDiT(input_size=SIZE, patch_size=PATCH, in_channels=CHANNELS, hidden_size=HIDDEN,
                                        depth=DEPTH, num_heads=HEADS, num_classes=CLASSES)
    teacher.load_state_dict(random_official_state(3))
    student = ARD(teacher.eval(), num_steps=4, history_layers=history_layers, stage_times=times,
                  parametrization="euler", time_convention="sit", **kwargs).eval()
    return teacher.eval(), student


STAGE_TIMES = [1 - s for s in time_grid(8, 1 / 0.3)[[0, 2, 4, 6]].tolist()]  # K=4 on the official shifted grid


@pytest.mark.parametrize("history_layers", [0, 1])
def test_euler_heads_start_as_the_teachers_one_jump_euler(history_layers):
    """Every stage of an N=0 student, stage 0 of any: the teacher's Euler step from the stage's input (the heads
    are the teacher's final layer, RMSNorm weight included)."""
    teacher, student = student_of(history_layers, STAGE_TIMES)
    g = torch.Generator().manual_seed(4)
    stages, y = torch.randn(3, 4, CHANNELS, SIZE, SIZE, generator=g), torch.tensor([0, 5, 9])
    sigmas = [1 - t for t in STAGE_TIMES] + [0.0]
    velocity = GuidedVelocity(teacher, CONVENTIONS["sit"])
    with torch.no_grad():
        got = student(stages, y)
    for k in range(4 if history_layers == 0 else 1):
        step, = solve_progressive(velocity, stages[:, k], sigmas[k:k + 2], y)
        torch.testing.assert_close(got[:, k], step["sample"].float(), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("history_layers, history_input", [(1, "trajectory"), (2, "trajectory"), (1, "zeros")])
def test_cached_sampling_with_rotated_keys_equals_teacher_forcing(history_layers, history_input):
    """Each cached step rotates one stage's queries and keys at the grid's positions, the teacher-forced pass every
    stage at the same positions: equal only if every stage sits at the same 2-D positions."""
    _, student = student_of(history_layers, STAGE_TIMES, history_input=history_input)
    noise, y = torch.randn(2, CHANNELS, SIZE, SIZE), torch.tensor([3, 7])
    with torch.no_grad():
        sampled = student.sample(noise, y)
        forced = student(torch.cat([noise[:, None], sampled[:, :-1]], dim=1), y)
    torch.testing.assert_close(forced, sampled, rtol=1e-5, atol=1e-5)


def test_rotated_queries_and_keys_keep_their_dtype():
    """Under bf16 autocast q, k and v leave the qkv projection in bf16; the rotation by fp32 tables must not promote
    q and k to fp32 (FlexAttention takes one dtype, and the KV cache would hold fp32 keys beside bf16 values)."""
    teacher, _ = student_of(1, STAGE_TIMES)
    attention = teacher.blocks[0].attn
    tokens, head_dim = attention.cos.shape
    q = torch.randn(2, 1, 2 * tokens, head_dim)
    rotated = attention.position(q.bfloat16())
    assert rotated.dtype == torch.bfloat16
    torch.testing.assert_close(rotated.float(), attention.position(q), rtol=1e-2, atol=1e-2)


def test_official_settings_in_the_projects_terms():
    """800 epochs: 250 grid points shifted by 0.3, guidance from t = 0.125: 249 steps on time_grid's 1/0.3 shift,
    guided at σ <= 0.875, 3 channels, whose grid is the official one in σ = 1 - t."""
    official = lightningdit.OFFICIAL_SAMPLING["800ep"]
    settings = lightningdit.flow_settings(official["cfg_interval_start"], official["timestep_shift"],
                                          official["num_steps"])
    assert settings == dict(time_convention="sit", solver="euler", time_shift=1 / 0.3, guidance_channels=3,
                            guidance_interval=(0.0, 0.875), steps=249)
    t = torch.linspace(0, 1, 250, dtype=torch.float64)
    torch.testing.assert_close(1 - time_grid(249, settings["time_shift"]), 0.3 * t / (1 - 0.7 * t), rtol=0, atol=1e-15)
