"""The linear interpolant x_σ = (1 - σ)·x + σ·ε and its probability-flow ODE dx/dσ = u = ε - x (package docstring)."""
from dataclasses import dataclass

import torch

from models import guided_output

SOLVERS = ("euler", "heun")  # on a fixed grid: the solves that trajectories and students are made of
ADAPTIVE = "dopri5"  # SiT's default ODE solver (torchdiffeq), for a teacher's reference row only
SIT_TOLERANCES = dict(atol=1e-6, rtol=1e-3)  # SiT's --atol, --rtol defaults
LAST_STEPS = ("euler", "heun")


@dataclass(frozen=True)
class Convention:
    """A teacher's time convention. SiT puts data at t = 1 (t = 1 - σ, its velocity x - ε = -u);
    REPA puts data at t = 0 (t = σ, its velocity ε - x = u). Both feed raw t in [0, 1] to the network.
    `last_step` is how its own Heun solve ends: SiT's torchdiffeq heun2 takes a full Heun step on the last interval
    too; REPA's euler_sampler(heun=True) takes an Euler step there (no evaluation at the data end)."""

    name: str
    data_at_one: bool
    last_step: str

    def model_time(self, sigma):
        """The time the network is fed at noise level σ; the map is its own inverse (σ of a model time)."""
        return 1 - sigma if self.data_at_one else sigma

    def velocity(self, output):
        """u from the network's velocity output; also its own inverse (the network's target from u)."""
        return -output if self.data_at_one else output


CONVENTIONS = {"sit": Convention("sit", data_at_one=True, last_step="heun"),
               "repa": Convention("repa", data_at_one=False, last_step="euler")}


def last_step_of(solver, convention, last_step=None):
    """How a `solver` solve ends: Euler's with Euler; Heun's with `last_step`, by default the teacher's own."""
    if last_step not in (None, *LAST_STEPS):
        raise ValueError(f"last step must be one of {', '.join(LAST_STEPS)}, got {last_step!r}")
    if solver != "heun":
        if last_step not in (None, "euler"):
            raise ValueError(f"a {last_step} last step is for the heun solver, got {solver!r}")
        return "euler"
    return last_step or convention.last_step


def time_grid(steps, shift=1.0):
    """(steps + 1,) float64 noise levels from 1 to 0: uniform, or with shift s the grid σ -> sσ / (1 + (s - 1)σ)
    (s > 1 spends more steps at high noise, as SD3's shift). `steps` counts intervals, as REPA's --num-steps;
    SiT's --num-sampling-steps counts grid points (steps + 1)."""
    if steps < 1:
        raise ValueError(f"a flow solve needs at least 1 step, got {steps}")
    if shift <= 0:
        raise ValueError(f"time shift must be positive, got {shift}")
    sigma = torch.linspace(1, 0, steps + 1, dtype=torch.float64)
    return shift * sigma / (1 + (shift - 1) * sigma)


def student_steps(num_steps, teacher_steps):
    """Indices into a `teacher_steps`-step grid of the K student stages: the points round(k·S/K), so that the
    stages are uniform in the grid's own (possibly shifted) time and the last one ends at the teacher's sample."""
    if not 1 <= num_steps <= teacher_steps:
        raise ValueError(f"student steps must be in [1, {teacher_steps}], got {num_steps}")
    return [round(k * teacher_steps / num_steps) for k in range(num_steps)]


def sigma_of_alpha_bar(alpha_bar):
    """The linear path's noise level of a variance-preserving state with ᾱ: x_vp / (√ᾱ + √(1-ᾱ)) lies on the path."""
    alpha_bar = torch.as_tensor(alpha_bar, dtype=torch.float64)
    return (1 - alpha_bar).sqrt() / (alpha_bar.sqrt() + (1 - alpha_bar).sqrt())


def x0_from_velocity(x, u, sigma):
    return x - sigma * u


def euler_jump(x, output, sigma, sigma_next, convention):
    """(the state at σ_next, x0) of one Euler step from x at σ, `output` being the network's velocity in `convention`."""
    u = convention.velocity(output)
    return x + (sigma_next - sigma) * u, x0_from_velocity(x, u, sigma)


class GuidedVelocity:
    """u(x, σ, y) of a class-conditional network (its first C output channels) in its `convention`, with
    classifier-free guidance uncond + scale·(cond - uncond) on the first `guidance_channels` channels (SiT: 3 of 4,
    DiT's quirk; None: all, REPA) when σ lies in `interval` (REPA's guidance interval, in noise level = REPA's t).
    The state keeps its dtype (float64 in the solves, as REPA); the network sees `dtype`."""

    def __init__(self, network, convention, cfg_scale=1.0, guidance_channels=None, interval=(0.0, 1.0),
                 dtype=torch.float32):
        if cfg_scale < 1:
            raise ValueError(f"CFG scale must be >= 1, got {cfg_scale}")
        if not 0 <= interval[0] <= interval[1] <= 1:
            raise ValueError(f"guidance interval must satisfy 0 <= low <= high <= 1, got {tuple(interval)}")
        self.network, self.convention, self.cfg_scale = network, convention, cfg_scale
        self.channels = network.in_channels if guidance_channels is None else min(guidance_channels,
                                                                                  network.in_channels)
        self.interval, self.dtype = tuple(interval), dtype

    def guides(self, sigma):
        return self.cfg_scale > 1 and self.interval[0] <= sigma <= self.interval[1]

    def __call__(self, x, sigma, y, guide):
        n = len(x)
        if guide:
            x, y = torch.cat([x, x]), torch.cat([y, torch.full_like(y, self.network.num_classes)])
        t = torch.full((len(x),), self.convention.model_time(sigma), dtype=self.dtype, device=x.device)
        out = self.network(x.to(self.dtype), t, y)[:, : self.network.in_channels].to(x.dtype)
        if guide:
            out = guided_output(out, self.cfg_scale, self.channels)[:n]
        return self.convention.velocity(out)


@torch.no_grad()
def solve_progressive(velocity, noise, grid, y, solver="euler", last_step=None):
    """Yields {"sample": the state at grid[i+1], "pred_xstart": the x0-prediction at grid[i]} after each step of
    an Euler or Heun solve from `noise` at grid[0], in float64. Heun's second evaluation is guided as its first
    (REPA decides by the step's start); its last step is `last_step` (last_step_of: by default the teacher's own)."""
    if solver not in SOLVERS:
        raise ValueError(f"solver must be one of {', '.join(SOLVERS)}, got {solver!r}")
    heun_until = len(grid) - 1 if last_step_of(solver, velocity.convention, last_step) == "heun" else len(grid) - 2
    x = noise.double()
    grid = [float(s) for s in grid]
    for i, (sigma, sigma_next) in enumerate(zip(grid[:-1], grid[1:])):
        guide = velocity.guides(sigma)
        u = velocity(x, sigma, y, guide)
        x_next = x + (sigma_next - sigma) * u
        if solver == "heun" and i < heun_until:
            u_next = velocity(x_next, sigma_next, y, guide)
            x_next = x + (sigma_next - sigma) * (0.5 * u + 0.5 * u_next)
        yield {"sample": x_next, "pred_xstart": x0_from_velocity(x, u, sigma)}
        x = x_next


@torch.no_grad()
def solve_adaptive(velocity, noise, y, atol=SIT_TOLERANCES["atol"], rtol=SIT_TOLERANCES["rtol"]):
    """The sample of SiT's default ODE solve, torchdiffeq's adaptive dopri5 from σ = 1 to 0 in float64 (guided where
    each evaluation's σ lies in the interval): a teacher's reference row, not a trajectory (no fixed grid)."""
    from torchdiffeq import odeint

    def u(sigma, x):
        sigma = float(sigma)
        return velocity(x, sigma, y, velocity.guides(sigma))
    span = torch.tensor([1.0, 0.0], dtype=torch.float64, device=noise.device)
    return odeint(u, noise.double(), span, method=ADAPTIVE, atol=atol, rtol=rtol)[-1]


def flow_matching_loss(network, x0, y, convention, noise=None, sigma=None):
    """Per-sample MSE of the network's velocity against the interpolant's, at σ uniform in [0, 1] (SiT and REPA)."""
    noise = torch.randn_like(x0) if noise is None else noise
    sigma = torch.rand(len(x0), device=x0.device) if sigma is None else sigma
    s = sigma.view(-1, *[1] * (x0.ndim - 1))
    x = (1 - s) * x0 + s * noise
    out = network(x, convention.model_time(sigma), y)[:, : x0.shape[1]]
    return ((out - convention.velocity(noise - x0)) ** 2).mean(dim=list(range(1, x0.ndim)))
