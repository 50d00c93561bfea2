"""LightningDiT (Yao et al., 2025; hustvl/LightningDiT) as a teacher: DiT's network with RMSNorm (with weight) in
place of LayerNorm, a SwiGLU MLP, and 2-D rotary positions on queries and keys (EVA's, the sin-cos absolute
embedding still added to the tokens), adaLN as DiT's, no learned sigma; LightningDiT-XL/1 works on 32-channel
VA-VAE latents at patch 1 (256 tokens at 256 px).

The official files (lightningdit-xl-imagenet256-800ep / -64ep) load strictly, bare or under "ema"; their rotary
tables (feat_rope.*) are checked against those of the grid. The official sampler is the flow module's (transport/)
under these settings: SiT's time convention, Euler on linspace(0, 1, 250) shifted t -> s·t / (1 + (s - 1)·t) with
s = timestep_shift 0.3 (in noise level σ = 1 - t that is time_grid's shift 1/s on 249 steps), guidance on the
first 3 channels, off where t < cfg_interval_start (σ > 1 - cfg_interval_start).
"""
import functools

import torch
import torch.nn as nn
import torch.nn.functional as F

from models import LIGHTNINGDIT_ROTARY, Attention, DiT, DiTBlock, FinalLayer

ARCH = "lightningdit"
# The official inference settings by checkpoint (configs/reproductions/*.yaml), in data-at-1 time.
OFFICIAL_SAMPLING = {"800ep": dict(cfg_scale=6.7, cfg_interval_start=0.125, timestep_shift=0.3, num_steps=250),
                     "64ep": dict(cfg_scale=10.0, cfg_interval_start=0.11, timestep_shift=0.3, num_steps=250)}


def flow_settings(cfg_interval_start, timestep_shift, num_steps):
    """The project's flow settings of LightningDiT's sampler: its shift s on data-at-1 time is time_grid's 1/s in
    noise level; guidance off below t = cfg_interval_start is the interval σ in [0, 1 - start]; its num_steps
    counts grid points (SiT's), ours steps."""
    return dict(time_convention="sit", solver="euler", time_shift=1 / timestep_shift, guidance_channels=3,
                guidance_interval=(0.0, 1 - cfg_interval_start), steps=num_steps - 1)


def rotary_tables(head_dim, grid):
    """(cos, sin), (grid², head_dim), of EVA's 2-D rotary embedding: the first half of a head's channels rotates by
    the token's row, the second by its column, in adjacent pairs at frequencies 10000^(-2i / (head_dim / 2))."""
    half = head_dim // 2
    freqs = 1.0 / 10000 ** (torch.arange(0, half, 2)[: half // 2].float() / half)
    positions = torch.arange(grid) / grid * grid  # as the official tables compute them (bit for bit)
    axis = torch.outer(positions, freqs).repeat_interleave(2, dim=-1)  # (grid, half)
    angles = torch.cat([axis[:, None].expand(grid, grid, half), axis[None].expand(grid, grid, half)], dim=-1)
    return angles.reshape(grid * grid, head_dim).cos(), angles.reshape(grid * grid, head_dim).sin()


def rotate_pairs(x):
    """(x1, x2) -> (-x2, x1) in each adjacent pair of channels."""
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    return torch.stack([-x2, x1], dim=-1).flatten(-2)


class RotaryAttention(Attention):
    """DiT's attention with the 2-D rotary embedding on queries and keys before the KV cache (cached keys are rotated).
    A sequence of several stages of grid² tokens each puts every stage at the same positions."""

    def __init__(self, dim, num_heads, grid):
        super().__init__(dim, num_heads)
        cos, sin = rotary_tables(dim // num_heads, grid)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)

    def position(self, x):
        tokens = len(self.cos)
        if x.shape[2] % tokens:
            raise ValueError(f"{x.shape[2]} tokens are not whole stages of the {tokens}-token square grid that "
                             f"LightningDiT's rotary embedding is defined on")
        stages = x.shape[2] // tokens
        # in x's dtype: under bf16 autocast q and k stay bf16 like v (FlexAttention requires one dtype; the cache
        # stores keys at the values' size), as the official model's SDPA casts them back
        return (x * self.cos.repeat(stages, 1) + rotate_pairs(x) * self.sin.repeat(stages, 1)).to(x.dtype)


class SwiGLU(nn.Module):
    """silu(x W1) * (x W2) W3, W1 and W2 stacked in one layer (w12) as the official files store them."""

    def __init__(self, dim, hidden):
        super().__init__()
        self.w12, self.w3 = nn.Linear(dim, 2 * hidden), nn.Linear(hidden, dim)

    def forward(self, x):
        gate, value = self.w12(x).chunk(2, dim=-1)
        return self.w3(F.silu(gate) * value)


class LightningDiTBlock(DiTBlock):
    def __init__(self, hidden_size, num_heads, mlp_ratio, grid):
        super().__init__(hidden_size, num_heads, mlp_ratio)
        self.norm1, self.norm2 = nn.RMSNorm(hidden_size, eps=1e-6), nn.RMSNorm(hidden_size, eps=1e-6)
        self.attn = RotaryAttention(hidden_size, num_heads, grid)
        self.mlp = SwiGLU(hidden_size, int(2 / 3 * int(hidden_size * mlp_ratio)))


class LightningFinalLayer(FinalLayer):
    def __init__(self, hidden_size, patch_size, out_channels):
        super().__init__(hidden_size, patch_size, out_channels)
        self.norm_final = nn.RMSNorm(hidden_size, eps=1e-6)


class RotaryTables(nn.Module):
    """Holds the official files' feat_rope.freqs_cos/sin (checked on loading; the blocks keep their own copies)."""

    def __init__(self, cos, sin):
        super().__init__()
        self.register_buffer("freqs_cos", cos.clone())
        self.register_buffer("freqs_sin", sin.clone())


class LightningDiT(DiT):
    """models.DiT's API (forward, forward_with_cfg, config) with LightningDiT's blocks; config["arch"] names it."""

    def __init__(self, input_size=16, patch_size=1, in_channels=32, hidden_size=1152, depth=28, num_heads=16,
                 mlp_ratio=4.0, class_dropout_prob=0.1, num_classes=1000, learn_sigma=False, arch=ARCH):
        if learn_sigma:
            raise ValueError("LightningDiT has no learned sigma")
        super().__init__(input_size, patch_size, in_channels, hidden_size, depth, num_heads, mlp_ratio,
                         class_dropout_prob, num_classes, learn_sigma=False)
        self.config["arch"] = ARCH
        self.feat_rope = RotaryTables(self.blocks[0].attn.cos, self.blocks[0].attn.sin)

    def make_block(self, hidden_size, num_heads, mlp_ratio):
        return LightningDiTBlock(hidden_size, num_heads, mlp_ratio, self.grid)

    def make_final_layer(self, hidden_size, patch_size, out_channels):
        return LightningFinalLayer(hidden_size, patch_size, out_channels)

    @property
    def grid(self):
        return self.config["input_size"] // self.config["patch_size"]

    def embed(self, x, t, y):
        size = self.config["input_size"]
        if tuple(x.shape[-2:]) != (size, size):
            raise ValueError(f"LightningDiT takes {size}x{size} inputs (its rotary and absolute positions are "
                             f"those of a square grid), got {x.shape[-2]}x{x.shape[-1]}")
        return super().embed(x, t, y)

    def load_state_dict(self, state_dict, strict=True, assign=False):
        """nn.Module's, then a check that the loaded rotary tables (feat_rope) are the ones the blocks use."""
        result = super().load_state_dict(state_dict, strict, assign)
        own = self.blocks[0].attn
        same = functools.partial(torch.allclose, rtol=0, atol=1e-6)  # tables computed elsewhere may round otherwise
        if not (same(self.feat_rope.freqs_cos, own.cos) and same(self.feat_rope.freqs_sin, own.sin)):
            raise ValueError(f"the rotary tables loaded (feat_rope) are not those of a {self.grid}x{self.grid} grid "
                             f"with head size {own.cos.shape[1]}")
        return result


def config_of(state_dict):
    """LightningDiT's constructor arguments read from an official state dict's shapes."""
    hidden, channels, patch, _ = state_dict["x_embedder.proj.weight"].shape
    head_dim = state_dict[LIGHTNINGDIT_ROTARY].shape[1]
    depth = 1 + max(int(k.split(".")[1]) for k in state_dict if k.startswith("blocks."))
    mlp_hidden = state_dict["blocks.0.mlp.w3.weight"].shape[1]
    classes = state_dict["y_embedder.embedding_table.weight"].shape[0]
    return dict(input_size=round(state_dict["pos_embed"].shape[1] ** 0.5) * patch, patch_size=patch,
                in_channels=channels, hidden_size=hidden, depth=depth, num_heads=hidden // head_dim,
                mlp_ratio=mlp_hidden * 3 / 2 / hidden, class_dropout_prob=0.1, num_classes=classes - 1,
                learn_sigma=False, arch=ARCH)
