"""DiT backbone (Peebles & Xie, 2023) with the official checkpoints' parameter layout.

Blocks take a conditioning tensor of shape (B, D) as in DiT, or (B, S, D) for a sequence
made of S equal groups of tokens, each with its own conditioning: the ARD student uses
this to compute adaLN once per stage instead of once per token.
"""
import argparse
import dataclasses
import hashlib
import json
import logging
import math
import os

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from timm.layers import Mlp, PatchEmbed
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import _EmptyStateDictLoadPlanner
from torch.distributed.checkpoint.state_dict_loader import _load_state_dict  # as format_utils.dcp_to_torch_save
from torch.nn.attention.flex_attention import BlockMask, flex_attention

from utils import atomic_write, in_download_turns

DIT_URL = "https://dl.fbaipublicfiles.com/DiT/models/{}"
# The official checkpoints by file name: resolution, where they download from, and what kind of teacher they are
# (their describe_checkpoint kind, teacher family and time convention).
OFFICIAL_CHECKPOINTS = {
    **{f"DiT-XL-2-{size}x{size}.pt": dict(image_size=size, url=DIT_URL.format(f"DiT-XL-2-{size}x{size}.pt"),
                                          kind="DiT", family="ddpm") for size in (256, 512)},
    "SiT-XL-2-256x256.pt": dict(image_size=256, kind="SiT", family="flow", time_convention="sit",
                                url="https://www.dl.dropboxusercontent.com/scl/fi/as9oeomcbub47de5g4be0/SiT-XL-2-256.pt"
                                    "?rlkey=uxzxmpicu46coq3msb17b9ofa&dl=0"),
}
# What a teacher's output is: "ddpm", an ε-prediction (DiT, DDIM solves); "flow", a velocity (SiT, REPA; transport/).
TEACHER_FAMILIES = {"ddpm": "DDPM (ε-prediction)", "flow": "flow-matching (velocity)"}
# What REPA's and REPA-E's training files hold that sampling never runs, by key prefix: dropped and named on loading.
# REPA's projector MLPs align features during training; REPA-E's latent batch norm holds statistics that its
# LDM-only checkpoints' sampler reads from the VAE's -latents-stats.pt instead (vavae.py).
TRAINING_ONLY = {"projectors.": "projector", "bn.": "batch-norm"}
LIGHTNINGDIT_ROTARY = "feat_rope.freqs_cos"  # LightningDiT's rotary tables: only its files have them
PRETRAINED_DIR = "pretrained_models"
DCP_METADATA = ".metadata"  # what torch.distributed.checkpoint writes last, once every rank's shards are written
torch.serialization.add_safe_globals([argparse.Namespace])  # REPA's checkpoints store their args as one


def modulate(x, shift, scale):
    """adaLN modulation. x: (B, N, D); shift, scale: (B, S, D), one row per group of N/S tokens."""
    B, N, D = x.shape
    S = shift.shape[1]
    x = x.view(B, S, N // S, D) * (1 + scale.unsqueeze(2)) + shift.unsqueeze(2)
    return x.view(B, N, D)


def gate(x, g):
    B, N, D = x.shape
    S = g.shape[1]
    return (x.view(B, S, N // S, D) * g.unsqueeze(2)).view(B, N, D)


def stage_tokens(x, runs, tokens):
    """The tokens (B, H, ., d) of the stages in `runs`, spans [a, b) of stages of `tokens` tokens each
    along dim 2: a view for one span, a copy of just those tokens for several."""
    parts = [x[:, :, a * tokens:b * tokens] for a, b in runs]
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=2)


class StageKeys:
    """Attention over K stages of `tokens` tokens each in which stage s sees the stages runs[s] (spans
    [a, b)), computed per stage: one SDPA of its queries over exactly the keys it sees, the layout of
    the KV-cached sampler. No (K·L)² mask exists, so the memory is that of the attention kernels."""

    def __init__(self, runs, tokens):
        self.runs, self.tokens = runs, tokens

    def __call__(self, q, k, v):
        """q, k, v: (B, H, K·L, d) -> (B, H, K·L, d)."""
        L = self.tokens
        return torch.cat([F.scaled_dot_product_attention(q[:, :, s * L:(s + 1) * L], stage_tokens(k, runs, L),
                                                         stage_tokens(v, runs, L))
                          for s, runs in enumerate(self.runs)], dim=2)


class KVCache:
    """Keys and values of the stages generated so far, for one attention layer.

    `append` stores the new stage's keys/values in a buffer of `capacity` tokens and returns
    those the new queries may see: the stages in `visible` (spans [a, b) of stages, set per
    stage by the sampler; None: every stage so far).
    """

    def __init__(self, capacity):
        self.capacity = capacity
        self.k = self.v = None
        self.length = 0
        self.visible = None

    def append(self, k, v):
        if self.k is None:
            shape = (*k.shape[:2], self.capacity, k.shape[3])
            self.k, self.v = k.new_empty(shape), v.new_empty(shape)
        tokens, end = k.shape[2], self.length + k.shape[2]
        self.k[:, :, self.length:end] = k
        self.v[:, :, self.length:end] = v
        self.length = end
        runs = self.visible or [(0, end // tokens)]
        return stage_tokens(self.k, runs, tokens), stage_tokens(self.v, runs, tokens)


class Attention(nn.Module):
    """Multi-head self-attention through PyTorch's fused kernels.

    `mask` is a boolean (queries, keys) mask for SDPA, a FlexAttention BlockMask, or a StageKeys
    (per-stage attention); with `cache`, keys/values of earlier calls are prepended to the current ones.
    """

    def __init__(self, dim, num_heads):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, mask=None, cache=None):
        B, N, D = x.shape
        q, k, v = self.qkv(x).view(B, N, 3, self.num_heads, D // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k = self.position(q), self.position(k)
        if cache is not None:
            k, v = cache.append(k, v)
        if isinstance(mask, BlockMask):
            x = flex_attention(q, k, v, block_mask=mask)
        elif isinstance(mask, StageKeys):
            x = mask(q, k, v)
        else:
            x = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.proj(x.transpose(1, 2).reshape(B, N, D))

    def position(self, x):
        """Queries or keys (B, H, N, d) with their positions applied: none here (DiT adds them to the tokens)."""
        return x


class TimestepEmbedder(nn.Module):
    """Sinusoidal features of the (integer or real) diffusion time, then a 2-layer MLP."""

    def __init__(self, hidden_size, frequency_embedding_size=256):
        super().__init__()
        self.frequency_embedding_size = frequency_embedding_size
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size)
        )
        # A buffer rather than computed per call: a compiled graph then has no CPU work (CUDA graphs need that).
        self.register_buffer("freqs", self.frequencies(frequency_embedding_size), persistent=False)

    @staticmethod
    def frequencies(dim, max_period=10000):
        """Computed on the CPU, like DiT, so the values are the same bits on every device."""
        half = dim // 2
        return torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32) / half)

    @staticmethod
    def timestep_embedding(t, dim, max_period=10000, freqs=None):
        freqs = TimestepEmbedder.frequencies(dim, max_period) if freqs is None else freqs
        args = t[:, None].float() * freqs.float().to(t.device)[None]
        embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        if dim % 2:
            embedding = torch.cat([embedding, torch.zeros_like(embedding[:, :1])], dim=-1)
        return embedding

    def forward(self, t):
        return self.mlp(self.timestep_embedding(t, self.frequency_embedding_size, freqs=self.freqs))


class LabelEmbedder(nn.Module):
    """Class embedding; index `num_classes` is the null class used for classifier-free guidance."""

    def __init__(self, num_classes, hidden_size, dropout_prob):
        super().__init__()
        self.embedding_table = nn.Embedding(num_classes + (dropout_prob > 0), hidden_size)
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob

    def forward(self, labels, train):
        if train and self.dropout_prob > 0:
            drop = torch.rand(labels.shape[0], device=labels.device) < self.dropout_prob
            labels = torch.where(drop, self.num_classes, labels)
        return self.embedding_table(labels)


class DiTBlock(nn.Module):
    def __init__(self, hidden_size, num_heads, mlp_ratio=4.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio), act_layer=lambda: nn.GELU(approximate="tanh"))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size))

    def forward(self, x, c, mask=None, cache=None):
        """x: (B, N, D); c: (B, S, D) conditioning for S equal groups of tokens."""
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=-1)
        x = x + gate(self.attn(modulate(self.norm1(x), shift_msa, scale_msa), mask, cache), gate_msa)
        return x + gate(self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp)), gate_mlp)


class FinalLayer(nn.Module):
    def __init__(self, hidden_size, patch_size, out_channels):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))

    def forward(self, x, c):
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=-1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


def unpatchify(x, patch_size, channels):
    """(B, L, p*p*C) tokens -> (B, C, H, W) images."""
    p, h = patch_size, int(x.shape[1] ** 0.5)
    x = x.reshape(x.shape[0], h, h, p, p, channels)
    return torch.einsum("nhwpqc->nchpwq", x).reshape(x.shape[0], channels, h * p, h * p)


def sincos_pos_embed_2d(embed_dim, grid_size):
    """Fixed 2-D sin-cos position embedding (grid_size**2, embed_dim), as in MAE and DiT."""
    def sincos_1d(dim, pos):
        omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2.0))
        out = pos.reshape(-1, 1) * omega
        return torch.cat([torch.sin(out), torch.cos(out)], dim=1)

    coords = torch.arange(grid_size, dtype=torch.float64)
    grid_w, grid_h = torch.meshgrid(coords, coords, indexing="xy")  # first half encodes the column
    emb = torch.cat([sincos_1d(embed_dim // 2, grid_w), sincos_1d(embed_dim // 2, grid_h)], dim=1)
    return emb.float()


class DiT(nn.Module):
    """Diffusion transformer with adaLN-Zero blocks."""

    constant_buffers = True  # time frequencies, set once: DDP need not broadcast them (train.distributed)

    def __init__(self, input_size=32, patch_size=2, in_channels=4, hidden_size=1152, depth=28, num_heads=16,
                 mlp_ratio=4.0, class_dropout_prob=0.1, num_classes=1000, learn_sigma=True):
        super().__init__()
        if input_size % patch_size:
            raise ValueError(f"input size {input_size} is not divisible by the patch size {patch_size}")
        if hidden_size % num_heads:
            raise ValueError(f"hidden size {hidden_size} is not divisible by {num_heads} heads")
        self.config = dict(input_size=input_size, patch_size=patch_size, in_channels=in_channels,
                           hidden_size=hidden_size, depth=depth, num_heads=num_heads, mlp_ratio=mlp_ratio,
                           class_dropout_prob=class_dropout_prob, num_classes=num_classes, learn_sigma=learn_sigma)
        self.learn_sigma = learn_sigma
        self.in_channels = in_channels
        self.out_channels = in_channels * 2 if learn_sigma else in_channels
        self.patch_size = patch_size
        self.num_classes = num_classes

        self.x_embedder = PatchEmbed(input_size, patch_size, in_channels, hidden_size, bias=True)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size, class_dropout_prob)
        num_patches = self.x_embedder.num_patches
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches, hidden_size), requires_grad=False)
        self.blocks = nn.ModuleList([self.make_block(hidden_size, num_heads, mlp_ratio) for _ in range(depth)])
        self.final_layer = self.make_final_layer(hidden_size, patch_size, self.out_channels)
        self.initialize_weights()

    def make_block(self, hidden_size, num_heads, mlp_ratio):
        return DiTBlock(hidden_size, num_heads, mlp_ratio)

    def make_final_layer(self, hidden_size, patch_size, out_channels):
        return FinalLayer(hidden_size, patch_size, out_channels)

    def initialize_weights(self):
        def xavier(module):
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        self.apply(xavier)
        grid_size = int(self.x_embedder.num_patches ** 0.5)
        self.pos_embed.data.copy_(sincos_pos_embed_2d(self.pos_embed.shape[-1], grid_size))
        w = self.x_embedder.proj.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.proj.bias)
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        # adaLN-Zero: every block starts as the identity and the output as zero.
        for layer in [*(block.adaLN_modulation[-1] for block in self.blocks),
                      self.final_layer.adaLN_modulation[-1], self.final_layer.linear]:
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def unpatchify(self, x):
        return unpatchify(x, self.patch_size, self.out_channels)

    def embed(self, x, t, y):
        """Patch tokens with position embedding, and the conditioning vector c = t_emb + y_emb."""
        return self.x_embedder(x) + self.pos_embed, self.t_embedder(t) + self.y_embedder(y, self.training)

    def forward(self, x, t, y):
        """x: (B, C, H, W) noisy input, t: (B,) timesteps, y: (B,) labels -> (B, out_channels, H, W)."""
        x, c = self.embed(x, t, y)
        c = c.unsqueeze(1)
        for block in self.blocks:
            x = block(x, c)
        return self.unpatchify(self.final_layer(x, c))

    def forward_with_cfg(self, x, t, y, cfg_scale, guidance_channels=3):
        """Classifier-free guidance on a batch whose second half carries the null label.

        DiT guides only the first 3 of the 4 latent channels; that is what reproduces its
        published FIDs, so it is the default (capped at the input channels). None guides all.
        """
        if cfg_scale < 1:
            raise ValueError(f"CFG scale must be >= 1, got {cfg_scale}")
        if self.y_embedder.dropout_prob == 0:
            raise ValueError("this model was built with class_dropout_prob=0: it has no null class to guide with")
        half = x[: len(x) // 2]
        out = self.forward(torch.cat([half, half]), t, y)
        n = self.in_channels if guidance_channels is None else min(guidance_channels, self.in_channels)
        return guided_output(out, cfg_scale, n)


def guided_output(out, cfg_scale, channels):
    """A model output on a [conditional; unconditional] batch with its first `channels` channels
    guided, uncond + scale·(cond - uncond), in both halves; the other channels as they are."""
    cond, uncond = out[:, :channels].chunk(2)
    guided = uncond + cfg_scale * (cond - uncond)
    return torch.cat([torch.cat([guided, guided]), out[:, channels:]], dim=1)


def with_guidance(model, noise, y, cfg_scale, guidance_channels=3):
    """(model function, noise, labels) for a sampler with classifier-free guidance: the batch is
    doubled, its second half with the null label. At scale 1 the model is used as it is."""
    if cfg_scale == 1:
        return model, noise, y
    def guided(x, t, y):
        return model.forward_with_cfg(x, t, y, cfg_scale, guidance_channels)
    return guided, torch.cat([noise, noise]), torch.cat([y, torch.full_like(y, model.num_classes)])


def _config(depth, hidden_size, patch_size, num_heads):
    """A named architecture; keyword arguments override any field (small teachers, tests)."""
    defaults = dict(depth=depth, hidden_size=hidden_size, patch_size=patch_size, num_heads=num_heads)
    return lambda **kw: DiT(**{**defaults, **kw})


DiT_models = {
    f"DiT-{name}/{p}": _config(depth, width, p, heads)
    for name, (depth, width, heads) in {"XL": (28, 1152, 16), "L": (24, 1024, 16),
                                         "B": (12, 768, 12), "S": (12, 384, 6)}.items()
    for p in (2, 4, 8)
}


def create_dit(model, image_size, latent=True, downsampling=8, **kwargs):
    """A DiT from the table by name, for an image size in pixels (latent models see size/downsampling: SD-VAE's 8)."""
    if model not in DiT_models:
        raise ValueError(f"unknown model {model!r}; choose from {', '.join(DiT_models)}")
    if latent and image_size % downsampling:
        raise ValueError(f"image size {image_size} is not divisible by {downsampling} (the VAE's downsampling factor)")
    input_size = image_size // downsampling if latent else image_size
    patch_size = kwargs.get("patch_size", int(model.split("/")[1]))
    if input_size % patch_size:
        raise ValueError(f"image size {image_size} gives a {input_size}x{input_size} model input, which is not "
                         f"divisible by the patch size {patch_size}")
    return DiT_models[model](input_size=input_size, **kwargs)


# ---------------------------------------------------------------------------- checkpoints

def load_state_dict_strict(model, state_dict, source="checkpoint"):
    """load_state_dict(strict=True) with an error that names the first offending keys."""
    own = model.state_dict()
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    mismatched = [f"{k}: {tuple(state_dict[k].shape)} vs model {tuple(v.shape)}"
                  for k, v in own.items() if k in state_dict and state_dict[k].shape != v.shape]
    if missing or unexpected or mismatched:
        def first(keys):
            return ", ".join(keys[:3]) + (f" (+{len(keys) - 3} more)" if len(keys) > 3 else "")
        problems = [f"{what}: {first(keys)}" for what, keys in
                    (("missing", missing), ("unexpected", unexpected), ("shape mismatch", mismatched)) if keys]
        raise ValueError(f"{source} does not match the model: " + "; ".join(problems))
    model.load_state_dict(state_dict, strict=True)
    return model


def download_official(name):
    """Path of an official DiT or SiT checkpoint, downloaded into pretrained_models/ if needed, under torchrun by
    one rank per folder (utils.in_download_turns: every rank calls this, the others wait)."""
    path = os.path.join(PRETRAINED_DIR, name)

    def fetch():
        if os.path.isfile(path):
            return
        os.makedirs(PRETRAINED_DIR, exist_ok=True)
        url = OFFICIAL_CHECKPOINTS[name]["url"]
        try:
            torch.hub.download_url_to_file(url, path, progress=True)
        except OSError as e:
            raise FileNotFoundError(f"could not download {url} ({e}); place the file at {path}") from None
    in_download_turns(fetch)
    return path


def is_sharded_checkpoint(path):
    """Whether `path` is a folder of torch.distributed.checkpoint (train.py's checkpoints)."""
    return os.path.isfile(os.path.join(str(path), DCP_METADATA))


def checkpoint_error(error, what):
    """torch.distributed.checkpoint's CheckpointException (a BaseException, past `except Exception`, with each
    failed rank's error) as an OSError saying `what` and the error of the lowest failed rank."""
    rank, (cause, _) = min(error.failures.items(), key=lambda failure: failure[0])
    return OSError(f"{what}: rank {rank}: {type(cause).__name__}: {cause}")


def read_sharded_checkpoint(path):
    """A torch.distributed.checkpoint folder as the dict it was saved from, read whole by this process (no
    process group; non-tensor values load with weights_only)."""
    state = {}
    try:
        _load_state_dict(state, storage_reader=FileSystemReader(path), planner=_EmptyStateDictLoadPlanner(),
                         no_dist=True)
    except CheckpointException as e:
        raise checkpoint_error(e, f"{path} does not read") from None
    for value in state.values():  # the format keys an optimiser's per-parameter state by str(index)
        if isinstance(value, dict) and value.keys() >= {"state", "param_groups"}:
            value["state"] = {int(k): v for k, v in value["state"].items()}
    return state


def read_checkpoint(path):
    """Everything stored at `path`: a training checkpoint (a torch.distributed.checkpoint folder, or the single .pt
    file of older runs) or a bare state dict (.pt), or a .safetensors state dict; one written by `export_ema` reads
    as {"ema", "args"}."""
    if is_sharded_checkpoint(path):
        return read_sharded_checkpoint(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.endswith(".safetensors"):
        with safe_open(path, "pt") as f:
            metadata = f.metadata() or {}
        tensors = load_file(path)
        return {"ema": tensors, "args": json.loads(metadata["args"])} if "args" in metadata else tensors
    return torch.load(path, map_location="cpu", weights_only=True, mmap=True)


def export_ema(checkpoint, out_path, half=False):
    """The EMA weights of a training checkpoint (read_checkpoint's dict) as .safetensors, with its args as
    metadata, for sharing; `half` stores floating-point tensors in float16."""
    tensors = {k: (v.half() if half and v.is_floating_point() else v).contiguous()
               for k, v in checkpoint["ema"].items()}
    atomic_write(out_path, lambda tmp: save_file(tensors, tmp, metadata={"args": json.dumps(checkpoint["args"])}))


def open_checkpoint(name):
    """read_checkpoint of an official checkpoint name (downloaded if needed) or a local file."""
    return read_checkpoint(download_official(name) if name in OFFICIAL_CHECKPOINTS else name)


def find_model(name):
    """State dict for an official checkpoint name or a local file (our checkpoints give their EMA)."""
    return describe_checkpoint(name).state_dict


def weights_sha256(module):
    """SHA-256 of a module's state dict (names, dtypes, shapes and bytes): the identity of its
    weights, whatever file or name they were loaded from."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)};".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def load_teacher(ckpt, model="DiT-XL/2", image_size=256, vae="ema", num_classes=1000, family="ddpm",
                 time_convention=None, found=None):
    """(DiT in eval mode, its description) from an official name, one of our teacher checkpoints, REPA's
    checkpoint or a bare state dict, given as a teacher of `family` (TEACHER_FAMILIES) and, for flow
    teachers, `time_convention` (transport.CONVENTIONS; default: the checkpoint's own).

    Our checkpoints carry their architecture; for the others it comes from `model` and `image_size` on the
    latents of `vae` (latent_geometry), with the patch size and learn_sigma read from the file; a LightningDiT
    file (lightningdit.py) carries its whole architecture. The description is what downstream files record, the
    weights' SHA-256, the family and the time convention included.
    """
    if family not in TEACHER_FAMILIES:
        raise ValueError(f"teacher family must be one of {', '.join(TEACHER_FAMILIES)}, got {family!r}")
    found = found or describe_checkpoint(ckpt)  # a caller that identified the file already passes what it found
    if found.kind == "student":
        raise ValueError(f"{ckpt} is a {found.settings['stage']!r} checkpoint, not a teacher")
    if found.kind == "teacher":
        args = found.settings
        info = dict(dit=args["dit"], image_size=args["image_size"], vae=args["vae"])
    else:
        image_size = OFFICIAL_CHECKPOINTS.get(ckpt, {}).get("image_size", image_size)
        channels, downsampling = latent_geometry(vae) if vae != "none" else (3, 1)
        if found.kind == "LightningDiT":
            from lightningdit import config_of
            dit = config_of(found.state_dict)
            image_size = dit["input_size"] * downsampling
            if dit["in_channels"] != channels:
                raise ValueError(f"{ckpt} is a LightningDiT on {dit['in_channels']}-channel latents; --vae {vae} "
                                 f"has {channels}: pass the VA-VAE folder vavae.py writes")
        else:
            dit = create_dit(model, image_size, latent=vae != "none", downsampling=downsampling,
                             num_classes=num_classes, in_channels=channels,
                             patch_size=patch_size_of(found.state_dict, model),
                             learn_sigma=learns_sigma(found.state_dict, model)).config
        info = dict(dit=dit, image_size=image_size, vae=vae)
    info.update(teacher_kind(ckpt, found, family, time_convention))
    net = load_state_dict_strict(build_network(info["dit"]), found.state_dict, source=str(ckpt))
    return net.eval(), dict(info, ckpt=str(ckpt), weights_sha256=weights_sha256(net))


def build_network(config):
    """The network a config describes: DiT, or LightningDiT where config["arch"] says so."""
    if config.get("arch") == "lightningdit":
        from lightningdit import LightningDiT
        return LightningDiT(**config)
    return DiT(**config)


@dataclasses.dataclass(frozen=True)
class CheckpointFile:
    """What a checkpoint file is (describe_checkpoint): `kind` ("student" or "teacher": one of our checkpoints or
    exports; a FOREIGN_KINDS name; "state dict": weights that say nothing of themselves), the weights sampling
    uses, our settings ({} for the others), and what it says of its teacher family and time convention (None
    where it cannot say)."""
    kind: str
    state_dict: dict
    settings: dict
    family: str = None
    time_convention: str = None


def holds_training_only(prefix):
    return lambda state_dict: any(k.startswith(prefix) for k in state_dict)


def without_training_only(kind):
    """weights(ckpt, state_dict) of a `kind` file: its TRAINING_ONLY tensors dropped and named in the log."""
    def weights(ckpt, state_dict):
        dropped = {what: sorted(k for k in state_dict if k.startswith(prefix))
                   for prefix, what in TRAINING_ONLY.items()}
        named = " and ".join(f"its {len(keys)} {what} tensors" for what, keys in dropped.items() if keys)
        keys = ", ".join(k for keys in dropped.values() for k in keys)
        logging.getLogger(__name__).warning(f"{ckpt}: {kind} checkpoint; dropping {named}, unused in sampling: {keys}")
        return {k: v for k, v in state_dict.items() if not k.startswith(tuple(TRAINING_ONLY))}
    return weights


# Other projects' teachers, recognised by their weights' names, first match: (kind, recognises(state_dict),
# family, time convention, weights(ckpt, state_dict): those sampling uses). LightningDiT is told by its rotary
# tables, REPA-E by its latent batch norm, REPA by its projectors.
FOREIGN_KINDS = (
    ("LightningDiT", lambda sd: LIGHTNINGDIT_ROTARY in sd, "flow", "sit", lambda ckpt, sd: sd),
    ("REPA-E", holds_training_only("bn."), "flow", "repa", without_training_only("REPA-E")),
    ("REPA", holds_training_only("projectors."), "flow", "repa", without_training_only("REPA")),
)


def is_state_dict(value):
    return isinstance(value, dict) and bool(value) and all(isinstance(v, torch.Tensor) for v in value.values())


def held_weights(checkpoint):
    """The state dict a file holds bare or under "ema" or "model" (in that order); None for anything else."""
    if not isinstance(checkpoint, dict):
        return None
    return next((c for c in (checkpoint, checkpoint.get("ema"), checkpoint.get("model")) if is_state_dict(c)), None)


def describe_checkpoint(ckpt):
    """The CheckpointFile of an official name (downloaded if needed) or a file: our checkpoints and exports by
    their args; others bare or wrapped in "ema" (REPA's and REPA-E's training dicts: beside an argparse.Namespace
    of args) or "model". Any other file stops here with one line naming its top-level keys."""
    checkpoint = open_checkpoint(ckpt)
    settings = checkpoint.get("args") if isinstance(checkpoint, dict) else None
    if isinstance(settings, dict) and settings.get("stage"):
        kind = "teacher" if settings["stage"] == "teacher" else "student"
        return CheckpointFile(kind, checkpoint.get("ema", {}), settings, settings.get("teacher_family", "ddpm"),
                              settings.get("time_convention"))
    state_dict = held_weights(checkpoint)
    if state_dict is None:
        found = (f"top-level keys {', '.join(map(str, checkpoint))}" if isinstance(checkpoint, dict)
                 else f"a {type(checkpoint).__name__}")
        raise ValueError(f"{ckpt}: not a checkpoint we know ({found}); expected one of ours, an export, or a DiT/SiT/"
                         f"REPA/REPA-E/LightningDiT state dict bare or under 'ema' or 'model'")
    for kind, recognises, family, time_convention, weights in FOREIGN_KINDS:
        if recognises(state_dict):
            return CheckpointFile(kind, weights(ckpt, state_dict), {}, family, time_convention)
    official = OFFICIAL_CHECKPOINTS.get(ckpt)
    if official:
        return CheckpointFile(official["kind"], state_dict, {}, official["family"], official.get("time_convention"))
    return CheckpointFile("state dict", state_dict, {})


def patch_size_of(state_dict, model):
    """A state dict's patch size (REPA-E's SiT-XL/1 has 1 whatever --model says), else the model name's."""
    weight = state_dict.get("x_embedder.proj.weight")
    return int(model.split("/")[1]) if weight is None else weight.shape[-1]


def learns_sigma(state_dict, model):
    """Whether a state dict's output layer has DiT's 2C learned-sigma channels (SiT's file has; REPA's has not)."""
    weight = state_dict.get("final_layer.linear.weight")
    if weight is None:
        return True  # load_state_dict_strict names what is missing
    patch, channels = patch_size_of(state_dict, model), state_dict["x_embedder.proj.weight"].shape[1]
    return weight.shape[0] == 2 * patch * patch * channels


def teacher_kind(ckpt, found, family, time_convention):
    """{"teacher_family", "time_convention"} of a teacher given as `family`, checked against what the checkpoint
    says of itself (`found`: its CheckpointFile) before any solve."""
    if found.family not in (None, family):
        raise ValueError(f"{ckpt} is a {TEACHER_FAMILIES[found.family]} teacher, given as a "
                         f"{TEACHER_FAMILIES[family]} one: pass --teacher-family {found.family}")
    if family == "ddpm":
        if time_convention is not None:
            raise ValueError(f"a time convention ({time_convention}) is for flow teachers; {ckpt} is a DDPM teacher")
        return dict(teacher_family=family, time_convention=None)
    own = found.time_convention
    if own is not None and time_convention not in (None, own):
        raise ValueError(f"{ckpt} uses the {own!r} time convention, given as {time_convention!r}")
    if (time_convention or own) is None:
        raise ValueError(f"{ckpt} does not say its time convention: pass --time-convention (sit or repa)")
    return dict(teacher_family=family, time_convention=time_convention or own)


# ---------------------------------------------------------------------------- autoencoder

class Autoencoder(nn.Module):
    """Maps images in [-1, 1] to the diffusion model's space and back.

    With an SD-VAE it is the latent space scaled by 0.18215 (latent_norm "scalar"); with a VAE whose config holds
    per-channel statistics (a VA-VAE converted by vavae.py) it is (z - mean) / std times the config's scaling factor
    (latent_norm "per-channel", LightningDiT's and REPA-E's); without one (vae=None) the model works on pixels and
    both maps are the identity.
    """

    def __init__(self, vae=None, scale_factor=0.18215):
        super().__init__()
        self.vae = vae
        per_channel = vae is not None and vae.config.get("latents_mean") is not None
        self.latent_norm = "per-channel" if per_channel else "scalar"
        self.scale_factor = vae.config.scaling_factor if per_channel else scale_factor
        mean, std = (vae.config.latents_mean, vae.config.latents_std) if per_channel else ([0.0], [1.0])
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1), persistent=False)

    @torch.no_grad()
    def encode(self, images, sample=True):
        if self.vae is None:
            return images
        dist = self.vae.encode(images).latent_dist
        return ((dist.sample() if sample else dist.mode()) - self.mean) / self.std * self.scale_factor

    @torch.no_grad()
    def decode(self, latents):
        if self.vae is None:
            return latents
        return self.vae.decode(latents / self.scale_factor * self.std + self.mean).sample


def clips_x0(vae):
    """Whether DDIM clips a teacher's x0-predictions to [-1, 1]: in pixel space (no VAE), as ADM does;
    latents never are, as in DiT."""
    return vae == "none"


def latent_geometry(vae):
    """(channels, downsampling) of an autoencoder's latents without loading its weights: SD-VAE's (4, 8), or those
    of a local diffusers folder's config (a VA-VAE's: 32, 16)."""
    config = os.path.join(vae, "config.json")
    if vae in ("ema", "mse") or not os.path.isfile(config):
        return 4, 8
    with open(config) as f:
        config = json.load(f)
    return config["latent_channels"], 2 ** (len(config["block_out_channels"]) - 1)


def load_autoencoder(vae):
    """"none" for pixel space, "ema"/"mse" for stabilityai/sd-vae-ft-*, or a local diffusers folder (a VA-VAE
    converted by vavae.py included)."""
    if vae == "none":
        return Autoencoder()
    from diffusers.models import AutoencoderKL
    name = f"stabilityai/sd-vae-ft-{vae}" if vae in ("ema", "mse") else vae
    try:
        model = AutoencoderKL.from_pretrained(name)
    except OSError as e:
        raise FileNotFoundError(f"could not load the VAE {name!r} ({e.__class__.__name__}); when offline, "
                                f"pass --vae with a local folder saved by AutoencoderKL.save_pretrained") from None
    return Autoencoder(model.eval())
