"""Adversarial fine-tuning pieces: a discriminator on the frozen teacher's features, hinge
losses and the adaptive weight that balances them against the regression loss.

The feature network is a frozen copy of the teacher DiT; every block's output tokens feed a
small head of spectral-normalised 1-D convolutions over the token sequence, with projection
conditioning on the teacher's conditioning vector c = t_emb + y_emb.
"""
import copy
import math

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils.parametrizations import spectral_norm


class VirtualBatchNorm(nn.Module):
    """Batch norm with statistics over groups of `virtual_batch` samples, always from the batch
    (no running averages). A batch that does not split into equal groups is one group."""

    def __init__(self, channels, virtual_batch=8, eps=1e-5):
        super().__init__()
        self.virtual_batch, self.eps = virtual_batch, eps
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x):  # (B, C, L)
        B, C, L = x.shape
        groups = math.ceil(B / self.virtual_batch)
        if B % groups:
            groups = 1
        g = x.view(groups, B // groups, C, L)
        mean = g.mean(dim=(1, 3), keepdim=True)
        var = g.var(dim=(1, 3), keepdim=True, unbiased=False)
        g = (g - mean) * torch.rsqrt(var + self.eps)
        return g.view(B, C, L) * self.weight[:, None] + self.bias[:, None]


def conv_block(channels, kernel_size):
    conv = nn.Conv1d(channels, channels, kernel_size, padding=kernel_size // 2, padding_mode="circular")
    return nn.Sequential(spectral_norm(conv), VirtualBatchNorm(channels), nn.LeakyReLU(0.2))


class DiscriminatorHead(nn.Module):
    """Per-token logits (B, L) from one block's tokens (B, L, D) and the conditioning (B, D)."""

    def __init__(self, channels, cond_dim, cmap_dim=64):
        super().__init__()
        self.main = conv_block(channels, kernel_size=1)
        self.residual = conv_block(channels, kernel_size=9)
        self.out = spectral_norm(nn.Conv1d(channels, cmap_dim, kernel_size=1))
        self.cmap = nn.Linear(cond_dim, cmap_dim)

    def forward(self, tokens, c):
        h = self.main(tokens.transpose(1, 2))
        h = (h + self.residual(h)) / math.sqrt(2)
        out = self.out(h)  # (B, cmap_dim, L)
        return (out * self.cmap(c).unsqueeze(-1)).sum(dim=1) / math.sqrt(out.shape[1])


# Which teacher blocks feed a head (the paper: all of them), as a slice of the block list.
DISC_BLOCKS = {"all": lambda depth: slice(0, depth), "lower": lambda depth: slice(0, depth // 2),
               "upper": lambda depth: slice(depth // 2, depth)}


class Discriminator(nn.Module):
    """One head per teacher block of `blocks` (DISC_BLOCKS); returns logits (num_heads, B, L). The
    teacher's weights are frozen and it stays in eval mode (no label dropout); gradients flow through
    its activations. Blocks above the last one read are not run."""

    def __init__(self, teacher, cmap_dim=64, blocks="all"):
        super().__init__()
        self.features = copy.deepcopy(teacher).requires_grad_(False).eval()
        self.read = DISC_BLOCKS[blocks](len(teacher.blocks))
        if not teacher.blocks[self.read]:
            raise ValueError(f"--disc-blocks {blocks} reads no block of a {len(teacher.blocks)}-block teacher")
        width = teacher.config["hidden_size"]
        self.heads = nn.ModuleList([DiscriminatorHead(width, width, cmap_dim)
                                    for _ in teacher.blocks[self.read]])

    def train(self, mode=True):
        super().train(mode)
        self.features.eval()
        return self

    def forward(self, x, t, y):
        tokens, c = self.features.embed(x, t, y)
        logits = []
        for index, block in enumerate(self.features.blocks[:self.read.stop]):
            tokens = block(tokens, c.unsqueeze(1))
            if index >= self.read.start:
                logits.append(self.heads[index - self.read.start](tokens, c))
        return torch.stack(logits)


def discriminator_hinge_loss(logits_real, logits_fake):
    return F.relu(1 - logits_real).mean() + F.relu(1 + logits_fake).mean()


def generator_hinge_loss(logits_fake):
    return -logits_fake.mean()


def adaptive_weight(regression_loss, adversarial_loss, last_layer, scale=10.0, max_weight=1e4):
    """(λ, ||∇L_reg||, ||∇L_adv||): λ = ||∇L_reg|| / (||∇L_adv|| + 1e-4) on `last_layer`, clamped to
    [0, max_weight], times `scale`; the two norms tell which of them makes λ large or small."""
    grads = torch.stack([torch.autograd.grad(loss, last_layer, retain_graph=True)[0]
                         for loss in (regression_loss, adversarial_loss)])
    if dist.is_initialized():  # the gradients of the whole batch, so λ does not depend on the world size
        dist.all_reduce(grads)
        grads /= dist.get_world_size()
    regression_norm, adversarial_norm = grads[0].norm(), grads[1].norm()
    weight = regression_norm / (adversarial_norm + 1e-4)
    return weight.clamp(0, max_weight).detach() * scale, regression_norm, adversarial_norm
