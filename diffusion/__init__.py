"""Gaussian diffusion for DiT: linear/cosine schedules, respacing, DDPM and DDIM sampling."""
import numpy as np
import torch

from .gaussian_diffusion import GaussianDiffusion, get_named_beta_schedule
from .respace import SpacedDiffusion, space_timesteps

__all__ = ["GaussianDiffusion", "SpacedDiffusion", "create_diffusion", "ddim_jump", "space_timesteps",
           "stage_alphas", "student_timesteps"]


def create_diffusion(timestep_respacing, noise_schedule="linear", diffusion_steps=1000):
    """DiT's entry point: `create_diffusion("")` for training, `create_diffusion("250")` or
    `create_diffusion("ddim25")` for sampling on a respaced grid."""
    betas = get_named_beta_schedule(noise_schedule, diffusion_steps)
    if not timestep_respacing:
        timestep_respacing = [diffusion_steps]
    return SpacedDiffusion(space_timesteps(diffusion_steps, timestep_respacing), betas)


def student_timesteps(num_steps, teacher_steps=25, diffusion_steps=1000):
    """Indices into the teacher's sampling order and original timesteps of the K student stages.

    Stage k starts at the teacher grid point nearest to T·(K-k)/K: for K=4 on the 25-step
    grid, timesteps 999, 749, 500, 250 (sampling steps 0, 6, 12, 18).
    """
    if not 1 <= num_steps <= teacher_steps:
        raise ValueError(f"student steps must be in [1, {teacher_steps}], got {num_steps}")
    grid = sorted(space_timesteps(diffusion_steps, str(teacher_steps)), reverse=True)
    if num_steps == teacher_steps:
        return list(range(teacher_steps)), grid
    steps = [min(range(len(grid)), key=lambda i: abs(grid[i] - (diffusion_steps - 1) * (num_steps - k) / num_steps))
             for k in range(num_steps)]
    if len(set(steps)) != num_steps:
        raise ValueError(f"{num_steps} student steps do not fall on distinct points of a {teacher_steps}-step grid")
    return steps, [grid[i] for i in steps]


def stage_alphas(stage_times, noise_schedule="linear", diffusion_steps=1000):
    """(2, K) float64: ᾱ at each stage time and at the next stage's (1 after the last: the final sample)."""
    alphas_cumprod = GaussianDiffusion(get_named_beta_schedule(noise_schedule, diffusion_steps)).alphas_cumprod
    now = alphas_cumprod[list(stage_times)]
    return torch.tensor(np.stack([now, np.append(now[1:], 1.0)]))


def ddim_jump(x, eps, alpha_bar, alpha_bar_next, clip_x0):
    """(the state at ᾱ_next, x0) of one deterministic DDIM step from state x at ᾱ with ε-prediction eps,
    computed as GaussianDiffusion.ddim_sample(eta=0) does, in the dtype of x. With `clip_x0`, x0 is clipped
    to [-1, 1] with a straight-through gradient: the values are the solver's, and pixels predicted outside
    the range still learn (a plain clamp would pass them no gradient)."""
    x0 = (x - (1 - alpha_bar).sqrt() * eps) / alpha_bar.sqrt()
    if clip_x0:
        x0 = x0 + (x0.clamp(-1, 1) - x0).detach()
    eps = (x - alpha_bar.sqrt() * x0) / (1 - alpha_bar).sqrt()
    return alpha_bar_next.sqrt() * x0 + (1 - alpha_bar_next).sqrt() * eps, x0
