"""transport/: the linear interpolant's ODE against closed forms (a Gaussian toy), DDIM, and the guidance rule."""
import math

import pytest
import torch

import models
from diffusion import create_diffusion
from transport import (CONVENTIONS, SIT_TOLERANCES, GuidedVelocity, flow_matching_loss, sigma_of_alpha_bar,
                       solve_adaptive, solve_progressive, student_steps, time_grid, x0_from_velocity)

MU, SCALE = 0.7, 0.4  # the toy's data: x ~ N(MU, SCALE²) in every coordinate


def toy_mean_sd(sigma):
    """Mean and standard deviation of x_σ = (1 - σ)x + σε for the toy's data."""
    return (1 - sigma) * MU, ((1 - sigma) ** 2 * SCALE ** 2 + sigma ** 2) ** 0.5


def toy_velocity(x, sigma):
    """The exact u(x, σ) = E[ε - x0 | x_σ = x]: the ODE keeps (x - mean) / sd fixed."""
    mean, sd = toy_mean_sd(sigma)
    d_sd = (sigma - (1 - sigma) * SCALE ** 2) / sd
    return -MU + d_sd * (x - mean) / sd


class ToyNetwork:
    """The toy's exact velocity as a network in a teacher's convention: fed model time, returns its velocity."""

    in_channels, num_classes = 1, 10

    def __init__(self, convention):
        self.convention = convention

    def __call__(self, x, t, y):
        sigma = self.convention.model_time(t.double()).view(-1, 1, 1, 1)
        return self.convention.velocity(toy_velocity(x.double(), sigma))


def toy_velocity_field(convention):
    return GuidedVelocity(ToyNetwork(CONVENTIONS[convention]), CONVENTIONS[convention], dtype=torch.float64)


def toy_solve(convention, steps, solver, noise, last_step=None):
    y = torch.zeros(len(noise), dtype=torch.long)
    *_, last = solve_progressive(toy_velocity_field(convention), noise, time_grid(steps), y, solver, last_step)
    return last["sample"]


@pytest.mark.parametrize("convention", list(CONVENTIONS))
@pytest.mark.parametrize("solver, order", [("euler", 1), ("heun", 2)])
def test_solvers_converge_at_their_order_to_the_closed_form_flow(convention, solver, order):
    noise = torch.randn(64, 1, 2, 2, dtype=torch.float64)
    exact = MU + SCALE * noise  # σ = 1 -> 0 maps ε to MU + SCALE·ε
    errors = [(toy_solve(convention, steps, solver, noise) - exact).abs().max().item() for steps in (16, 32, 64)]
    rates = [math.log2(a / b) for a, b in zip(errors, errors[1:])]
    assert all(abs(rate - order) < 0.15 for rate in rates), (errors, rates)


def test_both_conventions_solve_the_same_ode():
    noise = torch.randn(8, 1, 2, 2, dtype=torch.float64)
    for last_step in ("euler", "heun"):
        torch.testing.assert_close(toy_solve("sit", 8, "heun", noise, last_step),
                                   toy_solve("repa", 8, "heun", noise, last_step))


def test_adaptive_solve_reaches_the_closed_form_flow_as_its_tolerances_tighten():
    noise = torch.randn(64, 1, 2, 2, dtype=torch.float64)
    y = torch.zeros(len(noise), dtype=torch.long)
    for convention in CONVENTIONS:
        sits = solve_adaptive(toy_velocity_field(convention), noise, y)  # SiT's rtol 1e-3 is a local error bound
        tight = solve_adaptive(toy_velocity_field(convention), noise, y, atol=1e-10, rtol=1e-10)
        assert (sits - (MU + SCALE * noise)).abs().max() < 1e-2
        assert (tight - (MU + SCALE * noise)).abs().max() < 1e-7


@pytest.mark.parametrize("sigma", [1.0, 0.8, 0.3, 0.05])
def test_x0_from_velocity_is_the_posterior_mean(sigma):
    x = torch.randn(100, dtype=torch.float64)
    mean, sd = toy_mean_sd(sigma)
    posterior = MU + (1 - sigma) * SCALE ** 2 / sd ** 2 * (x - mean)  # E[x0 | x_σ] of jointly Gaussian (x0, x_σ)
    torch.testing.assert_close(x0_from_velocity(x, toy_velocity(x, sigma), sigma), posterior, rtol=0, atol=1e-14)


def test_euler_on_the_linear_path_is_ddim_at_matching_noise_levels():
    """An ε-model on the 25-step DDIM grid read as a velocity on the linear path at σ = √(1-ᾱ)/(√ᾱ+√(1-ᾱ)): Euler's
    states are DDIM's divided by √ᾱ + √(1-ᾱ), and both predict the same x0."""
    diffusion = create_diffusion("25")
    timesteps = diffusion.timestep_map[::-1]
    alpha_bars = torch.tensor([*diffusion.alphas_cumprod[::-1], 1.0], dtype=torch.float64)
    sigmas = sigma_of_alpha_bar(alpha_bars)
    scales = alpha_bars.sqrt() + (1 - alpha_bars).sqrt()

    def eps_model(x, t, **kwargs):
        s = (t.double() / 1000).view(-1, 1, 1, 1)
        return torch.tanh(x.double() * (1.5 - s)) + 0.3 * torch.sin(3 * s + x.double())

    class VelocityNetwork:  # REPA's convention: fed σ, returns u = ε - x0
        in_channels, num_classes = 1, 10

        def __call__(self, x, t, y):
            i = int((sigmas[:-1] - t[0].double()).abs().argmin())
            ab, x_vp = alpha_bars[i], x.double() * scales[i]
            eps = eps_model(x_vp, torch.full((len(x),), timesteps[i]))
            return eps - (x_vp - (1 - ab).sqrt() * eps) / ab.sqrt()

    noise = torch.randn(4, 1, 4, 4, dtype=torch.float64)
    velocity = GuidedVelocity(VelocityNetwork(), CONVENTIONS["repa"], dtype=torch.float64)
    euler = list(solve_progressive(velocity, noise / scales[0], sigmas, torch.zeros(4, dtype=torch.long)))
    ddim = list(diffusion.ddim_sample_loop_progressive(
        lambda x, t: torch.cat([eps_model(x, t), torch.zeros_like(x)], 1).float(), noise.shape, noise.float(),
        clip_denoised=False))
    assert len(euler) == len(ddim) == 25
    for i, (a, b) in enumerate(zip(euler, ddim)):
        torch.testing.assert_close(a["sample"] * scales[i + 1], b["sample"].double(), rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(a["pred_xstart"], b["pred_xstart"].double(), rtol=1e-4, atol=1e-4)


def test_dit_stage_times_on_the_linear_path():
    alpha_bars = create_diffusion("").alphas_cumprod[[999, 749, 500, 250]]
    assert sigma_of_alpha_bar(alpha_bars).tolist() == pytest.approx([0.994, 0.945, 0.775, 0.489], abs=5e-4)


def test_time_grids_and_student_steps():
    torch.testing.assert_close(time_grid(4), torch.tensor([1, 0.75, 0.5, 0.25, 0], dtype=torch.float64))
    shifted = time_grid(4, shift=3.0)
    assert shifted[0] == 1 and shifted[-1] == 0
    torch.testing.assert_close(shifted[2], torch.tensor(0.75, dtype=torch.float64))  # 3·0.5 / (1 + 2·0.5)
    assert student_steps(4, 25) == [0, 6, 12, 19] and student_steps(4, 4) == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="time shift must be positive"):
        time_grid(4, shift=0)
    with pytest.raises(ValueError, match=r"student steps must be in \[1, 8\]"):
        student_steps(9, 8)


class CountingDiT(models.DiT):
    """A tiny DiT that counts its forwards by batch size (a guided call doubles the batch)."""

    def __init__(self):
        super().__init__(input_size=4, patch_size=2, in_channels=2, hidden_size=32, depth=1, num_heads=2,
                         num_classes=5, learn_sigma=True)
        with torch.no_grad():
            for p in self.parameters():
                p.add_(0.1 * torch.randn_like(p))
        self.calls = []

    def forward(self, x, t, y):
        self.calls.append(len(x))
        return super().forward(x, t, y)


@pytest.mark.parametrize("solver, guided, unguided", [("euler", 5, 3), ("heun", 10, 5)])
def test_guidance_interval_switches_cfg_exactly_at_its_ends(solver, guided, unguided):
    """8 steps: σ = 1, .875, ..., .125 (exact in binary); the interval [.25, .75] holds the 5 steps from .75 to .25,
    both ends included. Heun's last step is Euler, and its second evaluation is guided as its first."""
    net = CountingDiT().eval()
    noise, y = torch.randn(3, 2, 4, 4), torch.tensor([0, 1, 4])
    velocity = GuidedVelocity(net, CONVENTIONS["repa"], cfg_scale=2.0, interval=(0.25, 0.75))
    with_cfg = [out["sample"] for out in solve_progressive(velocity, noise, time_grid(8), y, solver)]
    assert net.calls.count(6) == guided and net.calls.count(3) == unguided
    plain = [out["sample"] for out in solve_progressive(GuidedVelocity(net, CONVENTIONS["repa"]), noise,
                                                          time_grid(8), y, solver)]
    assert torch.equal(with_cfg[1], plain[1]) and not torch.allclose(with_cfg[2], plain[2])


def test_guidance_guides_only_its_channels():
    """SiT's CFG guides 3 of 4 channels (DiT's quirk): the others are the conditional output."""
    net = CountingDiT().eval()
    x, y = torch.randn(3, 2, 4, 4, dtype=torch.float64), torch.tensor([0, 1, 4])
    t = torch.full((3,), 0.4)
    cond, uncond = net(x.float(), t, y)[:, :2].double(), net(x.float(), t, torch.full_like(y, 5))[:, :2].double()
    u = GuidedVelocity(net, CONVENTIONS["repa"], cfg_scale=3.0, guidance_channels=1)(x, 0.4, y, guide=True)
    close = dict(rtol=1e-5, atol=1e-5)  # one batch of 6 against two of 3
    torch.testing.assert_close(u[:, :1], uncond[:, :1] + 3.0 * (cond[:, :1] - uncond[:, :1]), **close)
    torch.testing.assert_close(u[:, 1:], cond[:, 1:], **close)


def test_flow_matching_loss_is_the_same_in_both_conventions():
    """A network and its mirror in the other convention (time 1 - t, velocity negated) have the same loss."""
    net = CountingDiT().eval()  # no label dropout
    x0, y = torch.randn(6, 2, 4, 4), torch.randint(0, 5, (6,))
    noise, sigma = torch.randn_like(x0), torch.rand(6)

    def mirrored(x, t, y):
        return -net(x, 1 - t, y)
    sit = flow_matching_loss(mirrored, x0, y, CONVENTIONS["sit"], noise, sigma)
    repa = flow_matching_loss(net, x0, y, CONVENTIONS["repa"], noise, sigma)
    torch.testing.assert_close(sit, repa)
    x = (1 - sigma.view(-1, 1, 1, 1)) * x0 + sigma.view(-1, 1, 1, 1) * noise
    by_hand = ((net(x, sigma, y)[:, :2] - (noise - x0)) ** 2).mean(dim=(1, 2, 3))
    torch.testing.assert_close(repa, by_hand)


def test_bad_guidance_settings():
    net = CountingDiT()
    with pytest.raises(ValueError, match="guidance interval"):
        GuidedVelocity(net, CONVENTIONS["repa"], cfg_scale=2.0, interval=(0.8, 0.2))
    with pytest.raises(ValueError, match="CFG scale must be >= 1"):
        GuidedVelocity(net, CONVENTIONS["repa"], cfg_scale=0.5)
    with pytest.raises(ValueError, match="solver must be one of euler, heun"):
        next(solve_progressive(GuidedVelocity(net, CONVENTIONS["repa"]), torch.randn(1, 2, 4, 4), time_grid(2),
                               torch.zeros(1, dtype=torch.long), "rk4"))


def heun_reference(velocity, noise, y, steps, heun_last):
    """A direct float64 Heun solve on the uniform grid, the last step Heun's or Euler's."""
    x, grid = noise.double(), [1 - i / steps for i in range(steps + 1)]
    for i, (sigma, sigma_next) in enumerate(zip(grid[:-1], grid[1:])):
        u = velocity(x, sigma, y, False)
        euler = x + (sigma_next - sigma) * u
        heun = x + (sigma_next - sigma) * 0.5 * (u + velocity(euler, sigma_next, y, False))
        x = heun if heun_last or i < steps - 1 else euler
    return x


@pytest.mark.parametrize("convention, own", [("sit", "heun"), ("repa", "euler")])
def test_heuns_last_step_both_ways_and_each_teachers_own(convention, own):
    net = CountingDiT().eval()
    velocity = GuidedVelocity(net, CONVENTIONS[convention])
    noise, y = torch.randn(3, 2, 4, 4, dtype=torch.float64), torch.tensor([0, 1, 4])
    solves = {}
    for last_step in ("euler", "heun", None):
        *_, last = solve_progressive(velocity, noise, time_grid(5), y, "heun", last_step)
        solves[last_step] = last["sample"]
    for last_step in ("euler", "heun"):
        reference = heun_reference(velocity, noise, y, 5, heun_last=last_step == "heun")
        torch.testing.assert_close(solves[last_step], reference, rtol=0, atol=1e-12)
    assert (solves["heun"] - solves["euler"]).abs().max() > 1e-3
    assert torch.equal(solves[None], solves[own])


def sit_drift(net):
    """SiT's ODE drift of a velocity model: the network's output at SiT's own time t (data at t = 1)."""
    return lambda t, x: net(x.float(), t.float().expand(len(x)), torch.tensor([0, 1, 4]))[:, :2].double()


def test_heun_last_step_is_sits_torchdiffeq_heun2_on_its_grid_points():
    """SiT: odeint(drift, z, linspace(0, 1, num_steps), method="heun2"); its num_steps = 6 points is our 5 steps."""
    from torchdiffeq import odeint
    net = CountingDiT().eval()
    noise = torch.randn(3, 2, 4, 4, dtype=torch.float64)
    sit = odeint(sit_drift(net), noise, torch.linspace(0, 1, 6, dtype=torch.float64), method="heun2")[-1]
    velocity = GuidedVelocity(net, CONVENTIONS["sit"])
    *_, ours = solve_progressive(velocity, noise, time_grid(5), torch.tensor([0, 1, 4]), "heun")
    torch.testing.assert_close(ours["sample"], sit, rtol=0, atol=1e-12)


def test_adaptive_solve_is_sits_dopri5_with_its_default_tolerances():
    from torchdiffeq import odeint
    net = CountingDiT().eval()
    noise = torch.randn(3, 2, 4, 4, dtype=torch.float64)
    span = torch.linspace(0, 1, 50, dtype=torch.float64)  # SiT's default --num-sampling-steps: outputs only
    sit = odeint(sit_drift(net), noise, span, method="dopri5", **SIT_TOLERANCES)[-1]
    ours = solve_adaptive(GuidedVelocity(net, CONVENTIONS["sit"]), noise, torch.tensor([0, 1, 4]))
    torch.testing.assert_close(ours, sit, rtol=0, atol=1e-12)  # σ from 1 to 0 takes the steps of t from 0 to 1
