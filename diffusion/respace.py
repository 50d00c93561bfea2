"""Sampling on a subset of the training timesteps (DiT/ADM respacing)."""
import numpy as np
import torch

from .gaussian_diffusion import GaussianDiffusion


def space_timesteps(num_timesteps, section_counts):
    """The set of original timesteps kept when respacing.

    `section_counts` is "ddimN" (stride-based, as in the DDIM paper) or comma-separated
    counts, one per equal section of the process, each spread uniformly with rounding
    ("25" keeps 0, 42, 83, ..., 957, 999).
    """
    if isinstance(section_counts, str):
        if section_counts.startswith("ddim"):
            wanted = int(section_counts[len("ddim"):])
            for stride in range(1, num_timesteps):
                if len(range(0, num_timesteps, stride)) == wanted:
                    return set(range(0, num_timesteps, stride))
            raise ValueError(f"cannot create exactly {wanted} steps with an integer stride")
        section_counts = [int(x) for x in section_counts.split(",")]
    size_per, extra = divmod(num_timesteps, len(section_counts))
    start, kept = 0, []
    for i, count in enumerate(section_counts):
        size = size_per + (1 if i < extra else 0)
        if size < count:
            raise ValueError(f"cannot divide a section of {size} steps into {count}")
        stride = 1 if count <= 1 else (size - 1) / (count - 1)
        position = 0.0
        for _ in range(count):  # accumulated, not multiplied: DiT's rounding near .5
            kept.append(start + round(position))
            position += stride
        start += size
    return set(kept)


class SpacedDiffusion(GaussianDiffusion):
    """The diffusion process restricted to `use_timesteps`, with betas recomputed so that the
    kept steps have the original marginals; the network still sees original timesteps."""

    def __init__(self, use_timesteps, betas):
        base = GaussianDiffusion(betas)
        self.timestep_map = []
        new_betas, last_alpha_cumprod = [], 1.0
        for i, alpha_cumprod in enumerate(base.alphas_cumprod):
            if i in use_timesteps:
                new_betas.append(1 - alpha_cumprod / last_alpha_cumprod)
                last_alpha_cumprod = alpha_cumprod
                self.timestep_map.append(i)
        super().__init__(np.array(new_betas))

    def model_timesteps(self, t):
        return torch.tensor(self.timestep_map, device=t.device, dtype=t.dtype)[t]
