"""Gaussian diffusion for DiT: linear/cosine schedules, respacing, DDPM and DDIM sampling."""
from .gaussian_diffusion import GaussianDiffusion, get_named_beta_schedule
from .respace import SpacedDiffusion, space_timesteps

__all__ = ["GaussianDiffusion", "SpacedDiffusion", "create_diffusion", "space_timesteps", "student_timesteps"]


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
