"""Tests for diffusion/: schedules, respacing, DDIM/DDPM steps and loops, q_sample and the
training loss, checked against closed forms and an independent float64 re-statement of
DiT's (ADM's) formulas."""
import math

import numpy as np
import pytest
import torch

from diffusion import create_diffusion, get_named_beta_schedule, student_timesteps
from diffusion.respace import space_timesteps

LINEAR_BETAS = np.linspace(1e-4, 0.02, 1000, dtype=np.float64)
BASE_ALPHAS_CUMPROD = np.cumprod(1.0 - LINEAR_BETAS)

DIT_25 = [0, 42, 83, 125, 166, 208, 250, 291, 333, 375, 416, 458, 500, 541, 583, 624, 666, 708, 749, 791,
          832, 874, 916, 957, 999]


def dit_space_timesteps(num_timesteps, counts):
    """DiT/ADM's uniform respacing, restated: a float position advanced by a fractional stride
    and rounded (Python's round-half-even) at every step."""
    size_per, extra = divmod(num_timesteps, len(counts))
    start, kept = 0, []
    for i, count in enumerate(counts):
        size = size_per + (1 if i < extra else 0)
        stride = 1 if count <= 1 else (size - 1) / (count - 1)
        position = 0.0
        for _ in range(count):
            kept.append(start + round(position))
            position += stride
        start += size
    return set(kept)


class Reference:
    """DiT's reverse-process coefficients for a set of kept timesteps, in float64 numpy."""

    def __init__(self, kept):
        self.kept = sorted(kept)
        ab = BASE_ALPHAS_CUMPROD[self.kept]
        ab_prev = np.append(1.0, ab[:-1])
        self.ab, self.ab_prev = ab, ab_prev
        self.betas = 1.0 - ab / ab_prev
        post_var = self.betas * (1.0 - ab_prev) / (1.0 - ab)
        self.post_log_var = np.log(np.append(post_var[1], post_var[1:]))
        self.coef1 = self.betas * np.sqrt(ab_prev) / (1.0 - ab)
        self.coef2 = (1.0 - ab_prev) * np.sqrt(1.0 - self.betas) / (1.0 - ab)

    def mean_var(self, x, out, i, clip):
        C = x.shape[1]
        eps, v = out[:, :C], out[:, C:]
        pred = np.sqrt(1.0 / self.ab[i]) * x - np.sqrt(1.0 / self.ab[i] - 1.0) * eps
        if clip:
            pred = np.clip(pred, -1, 1)
        frac = (v + 1) / 2
        log_var = frac * np.log(self.betas[i]) + (1 - frac) * self.post_log_var[i]
        return self.coef1[i] * pred + self.coef2[i] * x, log_var, pred

    def ddim(self, x, out, i, clip):
        _, _, pred = self.mean_var(x, out, i, clip)
        eps = (np.sqrt(1.0 / self.ab[i]) * x - pred) / np.sqrt(1.0 / self.ab[i] - 1.0)
        return pred * np.sqrt(self.ab_prev[i]) + np.sqrt(1.0 - self.ab_prev[i]) * eps, pred

    def ddpm(self, x, out, i, clip, noise):
        mean, log_var, pred = self.mean_var(x, out, i, clip)
        return mean + (i != 0) * np.exp(0.5 * log_var) * noise, pred


def smooth_model(x, t, **kwargs):
    """A deterministic, non-trivial (eps, variance) model of the original timestep."""
    s = (t.double() / 1000.0).view(-1, 1, 1, 1)
    eps = torch.tanh(x.double() * (1.5 - s)) + 0.3 * torch.sin(3 * s + x.double())
    v = torch.tanh(x.double() - s)
    return torch.cat([eps, v], dim=1).float()


def oracle_model(x0):
    """Predicts the exact noise that takes x0 to x at the (original) timestep t."""
    def model(x, t, **kwargs):
        ab = torch.from_numpy(BASE_ALPHAS_CUMPROD)[t].view(-1, 1, 1, 1)
        eps = (x.double() - ab.sqrt() * x0.double()) / (1 - ab).sqrt()
        return torch.cat([eps.float(), torch.zeros_like(x)], dim=1)
    return model


def pred_xstart_tolerance(t):
    """float32 x0 = x / sqrt(ab) - sqrt(1/ab - 1) eps cancels: its error grows like 1/sqrt(ab_t)."""
    return 3e-6 / math.sqrt(BASE_ALPHAS_CUMPROD[t])


# ----------------------------------------------------------------------------- schedules, respacing

def test_linear_schedule_is_dits():
    betas = get_named_beta_schedule("linear", 1000)
    assert betas.dtype == np.float64 and betas.shape == (1000,)
    np.testing.assert_array_equal(betas, LINEAR_BETAS)
    half = get_named_beta_schedule("linear", 500)  # scaled so the process keeps its overall shape
    assert half[0] == pytest.approx(2e-4) and half[-1] == pytest.approx(0.04)


def test_cosine_schedule():
    betas = get_named_beta_schedule("cosine", 1000)
    assert betas.shape == (1000,) and betas.max() <= 0.999 and betas.min() > 0
    def alpha_bar(t):
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2
    ab = np.cumprod(1 - betas)
    np.testing.assert_allclose(ab[:900], [alpha_bar((i + 1) / 1000) / alpha_bar(0) for i in range(900)], rtol=1e-9)
    with pytest.raises(ValueError, match="unknown noise schedule"):
        get_named_beta_schedule("quadratic", 1000)


def test_respacing_produces_dits_timestep_sets():
    assert sorted(space_timesteps(1000, "25")) == DIT_25
    assert space_timesteps(1000, "ddim25") == set(range(0, 1000, 40))
    s250 = sorted(space_timesteps(1000, "250"))
    assert len(s250) == 250 and s250[:6] == [0, 4, 8, 12, 16, 20] and s250[-1] == 999
    assert s250 == sorted(dit_space_timesteps(1000, [250]))
    assert space_timesteps(1000, "1000") == set(range(1000))
    assert space_timesteps(1000, [1000]) == set(range(1000))
    multi = space_timesteps(1000, "10,15,20")
    assert len(multi) == 45 and multi == dit_space_timesteps(1000, [10, 15, 20])
    assert space_timesteps(1000, "ddim50") == set(range(0, 1000, 20))


def test_respacing_matches_dit_for_every_count():
    wrong = [c for c in range(1, 1001) if space_timesteps(1000, str(c)) != dit_space_timesteps(1000, [c])]
    wrong += [(a, b) for a in range(1, 40) for b in range(1, 40)
              if space_timesteps(1000, f"{a},{b}") != dit_space_timesteps(1000, [a, b])]
    assert wrong == []


def test_respacing_rejects_impossible_requests():
    with pytest.raises(ValueError, match="exactly 999 steps"):
        space_timesteps(1000, "ddim999")
    with pytest.raises(ValueError, match="section of 1000 steps into 1001"):
        space_timesteps(1000, "1001")


@pytest.mark.parametrize("spacing", ["25", "ddim25", "250", "10,15,20", ""])
def test_spaced_process_keeps_the_original_marginals(spacing):
    base = create_diffusion("")
    spaced = create_diffusion(spacing)
    kept = sorted(space_timesteps(1000, spacing or "1000"))
    assert spaced.timestep_map == kept and spaced.num_timesteps == len(kept)
    np.testing.assert_allclose(base.alphas_cumprod, BASE_ALPHAS_CUMPROD, rtol=0, atol=1e-15)
    assert np.abs(spaced.alphas_cumprod - base.alphas_cumprod[kept]).max() <= 1e-12
    ref = Reference(kept)
    np.testing.assert_allclose(spaced.betas, ref.betas, rtol=1e-12, atol=0)
    np.testing.assert_allclose(spaced.posterior_log_variance_clipped, ref.post_log_var, rtol=1e-12)


def test_student_timesteps():
    assert student_timesteps(4) == ([0, 6, 12, 18], [999, 749, 500, 250])
    assert student_timesteps(1) == ([0], [999])
    assert student_timesteps(2) == ([0, 12], [999, 500])
    assert student_timesteps(8)[1] == [999, 874, 749, 624, 500, 375, 250, 125]
    grid = DIT_25[::-1]
    for k in range(1, 25):
        steps, times = student_timesteps(k)
        assert len(steps) == k and steps[0] == 0 and steps == sorted(set(steps))
        assert times == [grid[i] for i in steps]
        # Each stage starts at the grid point nearest to its share of the process.
        for j, t in enumerate(times):
            target = 999 * (k - j) / k
            assert abs(t - target) <= min(abs(g - target) for g in grid) + 1e-9
    steps, times = student_timesteps(24)
    assert steps == list(range(24)) and times == DIT_25[::-1][:24]
    # The stage times are points of the teacher's sampling order.
    order = create_diffusion("25").timestep_map[::-1]
    steps, times = student_timesteps(4)
    assert [order[i] for i in steps] == times
    for bad in (0, 26):
        with pytest.raises(ValueError, match="student steps"):
            student_timesteps(bad)


def test_student_timesteps_on_the_whole_teacher_grid():
    steps, times = student_timesteps(25)
    assert steps == list(range(25)) and times == DIT_25[::-1]


# ----------------------------------------------------------------------------- forward process

def test_q_sample_closed_form():
    diffusion = create_diffusion("")
    x0 = torch.randn(5, 3, 4, 4)
    noise = torch.randn_like(x0)
    t = torch.tensor([0, 1, 250, 998, 999])
    got = diffusion.q_sample(x0, t, noise)
    ab = BASE_ALPHAS_CUMPROD[t.numpy()][:, None, None, None]
    want = np.sqrt(ab) * x0.double().numpy() + np.sqrt(1 - ab) * noise.double().numpy()
    assert got.dtype == torch.float32
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-6, atol=1e-6)
    torch.manual_seed(3)
    implicit = diffusion.q_sample(x0, t)
    torch.manual_seed(3)
    assert torch.equal(implicit, diffusion.q_sample(x0, t, torch.randn_like(x0)))


def test_q_sample_on_a_spaced_process_uses_the_kept_steps():
    spaced = create_diffusion("25")
    x0, noise = torch.randn(3, 2, 4, 4), torch.randn(3, 2, 4, 4)
    t = torch.tensor([0, 12, 24])
    ab = BASE_ALPHAS_CUMPROD[[DIT_25[i] for i in t.tolist()]][:, None, None, None]
    want = np.sqrt(ab) * x0.double().numpy() + np.sqrt(1 - ab) * noise.double().numpy()
    np.testing.assert_allclose(spaced.q_sample(x0, t, noise).numpy(), want, rtol=1e-6, atol=1e-6)


# ----------------------------------------------------------------------------- training loss

def reference_vb_bits(x0, x_t, eps, v, i, ref):
    """DiT's variational term in bits per dimension, float64: the decoder NLL at t=0, else the KL."""
    mean_p, log_var_p, _ = ref.mean_var(x_t, np.concatenate([eps, v], 1), i, clip=False)
    mean_q = ref.coef1[i] * x0 + ref.coef2[i] * x_t
    log_var_q = ref.post_log_var[i]
    kl = 0.5 * (-1.0 + log_var_p - log_var_q + np.exp(log_var_q - log_var_p)
                + (mean_q - mean_p) ** 2 * np.exp(-log_var_p))

    def cdf(z):  # the tanh approximation of the standard normal CDF that DiT uses
        return 0.5 * (1.0 + np.tanh(np.sqrt(2.0 / np.pi) * (z + 0.044715 * z ** 3)))

    inv_std = np.exp(-0.5 * log_var_p)
    upper, lower = cdf(inv_std * (x0 - mean_p + 1 / 255)), cdf(inv_std * (x0 - mean_p - 1 / 255))
    log_prob = np.where(x0 < -0.999, np.log(np.maximum(upper, 1e-12)),
                        np.where(x0 > 0.999, np.log(np.maximum(1 - lower, 1e-12)),
                                 np.log(np.maximum(upper - lower, 1e-12))))
    axes = tuple(range(1, x0.ndim))
    return kl.mean(axis=axes) / np.log(2), -log_prob.mean(axis=axes) / np.log(2)


def test_training_losses_match_the_reference():
    diffusion = create_diffusion("")
    ref = Reference(range(1000))
    B, C = 4, 3
    x0 = (torch.rand(B, C, 4, 4) * 2 - 1)
    x0[:, :, 0, 0], x0[:, :, 0, 1] = -1.0, 1.0  # the NLL's edge bins
    noise = torch.randn_like(x0)
    t = torch.tensor([0, 0, 1, 500])
    output = torch.cat([noise + 0.3 * torch.randn_like(noise), torch.rand_like(noise) * 2 - 1], dim=1)
    seen = []

    def model(x, ts, y):
        seen.append((ts.clone(), y))
        return output

    terms = diffusion.training_losses(model, x0, t, model_kwargs=dict(y="labels"), noise=noise)
    assert seen[0][1] == "labels" and torch.equal(seen[0][0], t)
    for k in ("loss", "mse", "vb"):
        assert terms[k].shape == (B,) and torch.isfinite(terms[k]).all(), k
    torch.testing.assert_close(terms["mse"], ((noise - output[:, :C]) ** 2).mean(dim=(1, 2, 3)))
    torch.testing.assert_close(terms["loss"], terms["mse"] + terms["vb"])

    x_t = diffusion.q_sample(x0, t, noise).double().numpy()
    out64 = output.double().numpy()
    for b, i in enumerate(t.tolist()):
        kl, nll = reference_vb_bits(x0[b:b + 1].double().numpy(), x_t[b:b + 1], out64[b:b + 1, :C],
                                    out64[b:b + 1, C:], i, ref)
        want = nll if i == 0 else kl
        np.testing.assert_allclose(terms["vb"][b].item(), want[0], rtol=2e-4, atol=1e-6)
        if i == 0:  # the t=0 branch is the decoder NLL, not the KL formula
            assert abs(nll[0] - kl[0]) > 0.1 and abs(terms["vb"][b].item() - kl[0]) > 0.1


def test_training_losses_gradients():
    """The ε-MSE trains the mean only; the variational term trains the variance only."""
    diffusion = create_diffusion("")
    x0 = torch.rand(2, 3, 4, 4) * 2 - 1
    t = torch.tensor([3, 700])
    output = torch.randn(2, 6, 4, 4, requires_grad=True)
    terms = diffusion.training_losses(lambda x, ts: output, x0, t)
    (grad_vb,) = torch.autograd.grad(terms["vb"].sum(), output, retain_graph=True)
    (grad_mse,) = torch.autograd.grad(terms["mse"].sum(), output)
    assert not grad_vb[:, :3].any() and grad_vb[:, 3:].abs().sum() > 0
    assert not grad_mse[:, 3:].any() and grad_mse[:, :3].abs().sum() > 0


def test_training_losses_on_a_spaced_process_call_the_model_with_original_timesteps():
    spaced = create_diffusion("25")
    seen = []

    def model(x, ts):
        seen.append(ts.clone())
        return smooth_model(x, ts)

    terms = spaced.training_losses(model, torch.rand(3, 2, 4, 4) * 2 - 1, torch.tensor([0, 1, 24]))
    assert seen[0].tolist() == [0, 42, 999] and torch.isfinite(terms["loss"]).all()


# ----------------------------------------------------------------------------- DDIM

@pytest.mark.parametrize("spacing", ["25", "ddim25"])
def test_ddim_steps_match_the_reference(spacing):
    diffusion = create_diffusion(spacing)
    ref = Reference(space_timesteps(1000, spacing))
    x = torch.randn(3, 2, 4, 4) * 1.5
    for clip in (True, False):
        for i in range(diffusion.num_timesteps):
            t = torch.full((3,), i)
            got = diffusion.ddim_sample(smooth_model, x, t, clip_denoised=clip)
            out = smooth_model(x, diffusion.model_timesteps(t)).double().numpy()
            want, pred = ref.ddim(x.double().numpy(), out, i, clip)
            np.testing.assert_allclose(got["sample"].numpy(), want, rtol=1e-5, atol=2e-5)
            np.testing.assert_allclose(got["pred_xstart"].numpy(), pred, rtol=1e-5, atol=2e-5)


def test_ddim_is_deterministic_and_uses_no_randomness():
    diffusion = create_diffusion("25")
    noise = torch.randn(2, 3, 4, 4)
    torch.manual_seed(1)
    a = diffusion.ddim_sample_loop(smooth_model, noise.shape, noise=noise)
    torch.manual_seed(2)
    b = diffusion.ddim_sample_loop(smooth_model, noise.shape, noise=noise)
    assert torch.equal(a, b)
    assert a.shape == noise.shape and torch.isfinite(a).all() and not torch.equal(a, noise)


def test_ddim_eta_adds_seeded_noise():
    diffusion = create_diffusion("25")
    noise = torch.randn(2, 3, 4, 4)
    deterministic = diffusion.ddim_sample_loop(smooth_model, noise.shape, noise=noise)
    runs = []
    for seed in (5, 5, 6):
        torch.manual_seed(seed)
        runs.append(diffusion.ddim_sample_loop(smooth_model, noise.shape, noise=noise, eta=1.0))
    assert torch.equal(runs[0], runs[1]) and not torch.allclose(runs[0], runs[2])
    assert not torch.allclose(runs[0], deterministic)


def test_1000_step_ddim_recovers_x0_of_an_oracle():
    diffusion = create_diffusion("")
    assert diffusion.num_timesteps == 1000
    x0 = torch.rand(2, 3, 4, 4) * 1.8 - 0.9
    x_T = torch.randn_like(x0)
    outs = list(diffusion.ddim_sample_loop_progressive(oracle_model(x0), x0.shape, noise=x_T))
    assert len(outs) == 1000
    torch.testing.assert_close(outs[-1]["sample"], x0, rtol=0, atol=1e-6)
    # Every intermediate state lies on the exact path x_t = sqrt(ab) x0 + sqrt(1 - ab) eps*, where eps*
    # is the noise implied by x_T, and every x0-prediction is x0.
    ab_T = BASE_ALPHAS_CUMPROD[-1]
    eps_star = (x_T.double() - math.sqrt(ab_T) * x0.double()) / math.sqrt(1 - ab_T)
    for k, out in enumerate(outs):
        t, t_prev = 999 - k, 998 - k  # the state after the step from t
        ab_prev = BASE_ALPHAS_CUMPROD[t_prev] if t_prev >= 0 else 1.0
        want = math.sqrt(ab_prev) * x0.double() + math.sqrt(1 - ab_prev) * eps_star
        torch.testing.assert_close(out["sample"].double(), want, rtol=0, atol=2e-5)
        torch.testing.assert_close(out["pred_xstart"], x0, rtol=0, atol=pred_xstart_tolerance(t))


@pytest.mark.parametrize("spacing", ["25", "ddim25"])
def test_respaced_ddim_calls_the_network_with_original_timesteps(spacing):
    diffusion = create_diffusion(spacing)
    x0 = torch.rand(3, 2, 4, 4) * 1.8 - 0.9
    oracle, seen = oracle_model(x0), []

    def spy(x, t, **kwargs):
        seen.append(t.clone())
        return oracle(x, t)

    outs = list(diffusion.ddim_sample_loop_progressive(spy, x0.shape, noise=torch.randn_like(x0)))
    kept = sorted(space_timesteps(1000, spacing), reverse=True)
    assert [s.tolist() for s in seen] == [[k] * 3 for k in kept]
    assert all(s.dtype == torch.long and s.shape == (3,) for s in seen)
    # With the right alphas at each kept step the oracle's x0-prediction is x0 all the way.
    for t, out in zip(kept, outs):
        torch.testing.assert_close(out["pred_xstart"], x0, rtol=0, atol=pred_xstart_tolerance(t))
    torch.testing.assert_close(outs[-1]["sample"], x0, rtol=0, atol=1e-6)


def test_ddim_solves_the_probability_flow_ode_of_gaussian_data():
    """For x0 ~ N(0, s^2) the exact ODE maps x_T to x_T * s / sqrt(ab_T s^2 + 1 - ab_T); DDIM converges to it."""
    s = 0.5

    def exact_eps(x, t, **kwargs):
        ab = torch.from_numpy(BASE_ALPHAS_CUMPROD)[t].view(-1, 1, 1, 1)
        return torch.cat([(x.double() * (1 - ab).sqrt() / (ab * s * s + 1 - ab)).float(), torch.zeros_like(x)], 1)

    x_T = torch.randn(4, 2, 4, 4)
    ab_T = BASE_ALPHAS_CUMPROD[-1]
    exact = x_T.double() * s / math.sqrt(ab_T * s * s + 1 - ab_T)
    errors = {}
    for spacing in ("", "250", "25"):
        out = create_diffusion(spacing).ddim_sample_loop(exact_eps, x_T.shape, noise=x_T, clip_denoised=False)
        errors[spacing] = (out.double() - exact).abs().max().item() / exact.abs().max().item()
    assert errors[""] < 0.01
    assert errors[""] < errors["250"] < errors["25"]


def test_progressive_ddim_ends_with_ddim_sample_loop():
    diffusion = create_diffusion("25")
    noise = torch.randn(2, 3, 4, 4)
    outs = list(diffusion.ddim_sample_loop_progressive(smooth_model, noise.shape, noise=noise))
    assert len(outs) == 25 and all(set(o) >= {"sample", "pred_xstart"} for o in outs)
    assert torch.equal(outs[-1]["sample"], diffusion.ddim_sample_loop(smooth_model, noise.shape, noise=noise))
    # Each yielded state is one step from the previous one.
    x = noise
    for i, out in zip(range(24, -1, -1), outs):
        step = diffusion.ddim_sample(smooth_model, x, torch.full((2,), i))
        assert torch.equal(out["sample"], step["sample"]) and torch.equal(out["pred_xstart"], step["pred_xstart"])
        x = out["sample"]


def test_dit_style_call_with_a_tiny_dit_and_cfg():
    from models import DiT

    torch.manual_seed(0)
    model = DiT(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=1, num_heads=2,
                num_classes=5).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    diffusion = create_diffusion("ddim25")
    z = torch.randn(2, 4, 8, 8)
    z = torch.cat([z, z])
    y = torch.tensor([1, 3, 5, 5])
    kwargs = dict(y=y, cfg_scale=4.0)
    # DiT's sample.py call, positionally then with keywords.
    a = diffusion.ddim_sample_loop(model.forward_with_cfg, z.shape, z, False, kwargs, "cpu", False)
    b = diffusion.ddim_sample_loop(model.forward_with_cfg, z.shape, z, clip_denoised=False,
                                   model_kwargs=kwargs, progress=False, device="cpu")
    assert torch.equal(a, b) and a.shape == z.shape and torch.isfinite(a).all()
    torch.testing.assert_close(a[:2, :3], a[2:, :3], rtol=0, atol=0)  # both halves carry the guided eps
    torch.manual_seed(0)
    c = diffusion.p_sample_loop(model.forward_with_cfg, z.shape, z, clip_denoised=False, model_kwargs=kwargs,
                                device="cpu")
    assert c.shape == z.shape and torch.isfinite(c).all()


# ----------------------------------------------------------------------------- DDPM

def test_ddpm_steps_match_the_reference():
    diffusion = create_diffusion("50")
    ref = Reference(space_timesteps(1000, "50"))
    x = torch.randn(3, 2, 4, 4)
    for i in (49, 30, 1, 0):
        t = torch.full((3,), i)
        torch.manual_seed(i)
        got = diffusion.p_sample(smooth_model, x, t, clip_denoised=True)
        torch.manual_seed(i)
        noise = torch.randn_like(x).double().numpy()
        out = smooth_model(x, diffusion.model_timesteps(t)).double().numpy()
        want, pred = ref.ddpm(x.double().numpy(), out, i, True, noise)
        np.testing.assert_allclose(got["sample"].numpy(), want, rtol=1e-5, atol=2e-5)
        np.testing.assert_allclose(got["pred_xstart"].numpy(), pred, rtol=1e-5, atol=2e-5)


def test_ddpm_last_step_adds_no_noise():
    diffusion = create_diffusion("50")
    x, t = torch.randn(2, 3, 4, 4), torch.zeros(2, dtype=torch.long)
    mean = diffusion.p_mean_variance(smooth_model, x, t)["mean"]
    torch.manual_seed(1)
    a = diffusion.p_sample(smooth_model, x, t)["sample"]
    torch.manual_seed(2)
    b = diffusion.p_sample(smooth_model, x, t)["sample"]
    assert torch.equal(a, mean) and torch.equal(b, mean)


def test_ddpm_loop_is_reproducible_with_a_seed():
    diffusion = create_diffusion("50")
    shape = (2, 3, 4, 4)
    runs = []
    for seed in (7, 7, 8):
        torch.manual_seed(seed)
        runs.append(diffusion.p_sample_loop(smooth_model, shape))  # initial noise drawn too
    assert torch.equal(runs[0], runs[1]) and not torch.allclose(runs[0], runs[2])
    assert runs[0].shape == shape and torch.isfinite(runs[0]).all()
    torch.manual_seed(7)
    outs = list(diffusion.p_sample_loop_progressive(smooth_model, shape))
    assert len(outs) == 50 and torch.equal(outs[-1]["sample"], runs[0])
