"""Gaussian diffusion with DiT's parameterisation: ε-prediction with a learned variance range.

Coefficients are float64 numpy arrays indexed per timestep and cast to float32, and every
formula keeps DiT's order of operations, so samples are bit-identical to DiT's for the same
model, noise and timesteps.
"""
import math

import numpy as np
import torch
from tqdm.auto import tqdm


def get_named_beta_schedule(name, num_timesteps):
    if name == "linear":
        scale = 1000 / num_timesteps  # keeps the schedule's shape for any number of steps
        return np.linspace(scale * 0.0001, scale * 0.02, num_timesteps, dtype=np.float64)
    if name == "cosine":
        def alpha_bar(t):
            return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2
        return np.array([min(1 - alpha_bar((i + 1) / num_timesteps) / alpha_bar(i / num_timesteps), 0.999)
                         for i in range(num_timesteps)], dtype=np.float64)
    raise ValueError(f"unknown noise schedule {name!r} (linear, cosine)")


def extract(coefficients, t, ndim):
    """coefficients[t] as float32, shaped to broadcast over a tensor of `ndim` dimensions."""
    values = torch.from_numpy(coefficients).to(t.device)[t].float()
    return values.view(-1, *([1] * (ndim - 1)))


def mean_flat(x):
    return x.mean(dim=list(range(1, x.ndim)))


def normal_kl(mean1, logvar1, mean2, logvar2):
    """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)), elementwise, in nats."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2)
                  + ((mean1 - mean2) ** 2) * torch.exp(-logvar2))


def approx_standard_normal_cdf(x):
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3))))


def discretized_gaussian_log_likelihood(x, means, log_scales):
    """Log-likelihood of data in [-1, 1] quantised to 256 bins under a Gaussian, elementwise."""
    centered = x - means
    inv_stdv = torch.exp(-log_scales)
    cdf_plus = approx_standard_normal_cdf(inv_stdv * (centered + 1.0 / 255.0))
    cdf_min = approx_standard_normal_cdf(inv_stdv * (centered - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    cdf_delta = cdf_plus - cdf_min
    return torch.where(x < -0.999, log_cdf_plus,
                       torch.where(x > 0.999, log_one_minus_cdf_min, torch.log(cdf_delta.clamp(min=1e-12))))


class GaussianDiffusion:
    """The forward process q(x_t | x_0) and DDPM/DDIM reverse samplers for a model that outputs
    (ε, v) with v in [-1, 1] interpolating log-variance between β̃_t and β_t."""

    def __init__(self, betas):
        self.betas = betas = np.asarray(betas, dtype=np.float64)
        self.num_timesteps = len(betas)
        if self.num_timesteps < 2:
            raise ValueError(f"a diffusion process needs at least 2 timesteps, got {self.num_timesteps}")
        alphas = 1.0 - betas
        self.alphas_cumprod = np.cumprod(alphas)
        self.alphas_cumprod_prev = np.append(1.0, self.alphas_cumprod[:-1])
        self.sqrt_alphas_cumprod = np.sqrt(self.alphas_cumprod)
        self.sqrt_one_minus_alphas_cumprod = np.sqrt(1.0 - self.alphas_cumprod)
        self.sqrt_recip_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod)
        self.sqrt_recipm1_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod - 1)
        self.log_betas = np.log(betas)
        posterior_variance = betas * (1.0 - self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        # The posterior variance is 0 at t=0; its log is clipped to the next value.
        self.posterior_log_variance_clipped = np.log(np.append(posterior_variance[1], posterior_variance[1:]))
        self.posterior_mean_coef1 = betas * np.sqrt(self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        self.posterior_mean_coef2 = (1.0 - self.alphas_cumprod_prev) * np.sqrt(alphas) / (1.0 - self.alphas_cumprod)

    # ------------------------------------------------------------------ forward process

    def q_sample(self, x_start, t, noise=None):
        """x_t ~ q(x_t | x_0)."""
        noise = torch.randn_like(x_start) if noise is None else noise
        return (extract(self.sqrt_alphas_cumprod, t, x_start.ndim) * x_start
                + extract(self.sqrt_one_minus_alphas_cumprod, t, x_start.ndim) * noise)

    def q_posterior_mean(self, x_start, x_t, t):
        return (extract(self.posterior_mean_coef1, t, x_t.ndim) * x_start
                + extract(self.posterior_mean_coef2, t, x_t.ndim) * x_t)

    def predict_xstart_from_eps(self, x_t, t, eps):
        return (extract(self.sqrt_recip_alphas_cumprod, t, x_t.ndim) * x_t
                - extract(self.sqrt_recipm1_alphas_cumprod, t, x_t.ndim) * eps)

    def predict_eps_from_xstart(self, x_t, t, pred_xstart):
        return ((extract(self.sqrt_recip_alphas_cumprod, t, x_t.ndim) * x_t - pred_xstart)
                / extract(self.sqrt_recipm1_alphas_cumprod, t, x_t.ndim))

    # ------------------------------------------------------------------ reverse process

    def model_timesteps(self, t):
        """The timesteps the network is conditioned on (respacing maps them back to 0..999)."""
        return t

    def p_mean_variance(self, model, x, t, clip_denoised=True, model_kwargs=None, model_output=None):
        """Mean and log-variance of p(x_{t-1} | x_t), and the x_0 prediction."""
        if model_output is None:
            model_output = model(x, self.model_timesteps(t), **(model_kwargs or {}))
        eps, var_values = torch.split(model_output, x.shape[1], dim=1)
        min_log = extract(self.posterior_log_variance_clipped, t, x.ndim)
        max_log = extract(self.log_betas, t, x.ndim)
        frac = (var_values + 1) / 2
        log_variance = frac * max_log + (1 - frac) * min_log
        pred_xstart = self.predict_xstart_from_eps(x, t, eps)
        if clip_denoised:
            pred_xstart = pred_xstart.clamp(-1, 1)
        return {"mean": self.q_posterior_mean(pred_xstart, x, t), "log_variance": log_variance,
                "pred_xstart": pred_xstart}

    def p_sample(self, model, x, t, clip_denoised=True, model_kwargs=None):
        """One ancestral DDPM step."""
        out = self.p_mean_variance(model, x, t, clip_denoised, model_kwargs)
        noise = torch.randn_like(x)
        nonzero_mask = (t != 0).float().view(-1, *([1] * (x.ndim - 1)))
        sample = out["mean"] + nonzero_mask * torch.exp(0.5 * out["log_variance"]) * noise
        return {"sample": sample, "pred_xstart": out["pred_xstart"]}

    def ddim_sample(self, model, x, t, clip_denoised=True, model_kwargs=None, eta=0.0):
        """One DDIM step; eta=0 is the probability-flow ODE's deterministic solver."""
        out = self.p_mean_variance(model, x, t, clip_denoised, model_kwargs)
        eps = self.predict_eps_from_xstart(x, t, out["pred_xstart"])
        alpha_bar = extract(self.alphas_cumprod, t, x.ndim)
        alpha_bar_prev = extract(self.alphas_cumprod_prev, t, x.ndim)
        sigma = eta * torch.sqrt((1 - alpha_bar_prev) / (1 - alpha_bar)) * torch.sqrt(1 - alpha_bar / alpha_bar_prev)
        noise = torch.randn_like(x)  # drawn even at eta=0, so the RNG advances exactly as in DiT
        mean_pred = out["pred_xstart"] * torch.sqrt(alpha_bar_prev) + torch.sqrt(1 - alpha_bar_prev - sigma ** 2) * eps
        nonzero_mask = (t != 0).float().view(-1, *([1] * (x.ndim - 1)))
        return {"sample": mean_pred + nonzero_mask * sigma * noise, "pred_xstart": out["pred_xstart"]}

    def _loop_progressive(self, step, model, shape, noise, clip_denoised, model_kwargs, device, progress, **kw):
        if noise is None:
            if device is None and isinstance(model, torch.nn.Module):
                device = next(model.parameters()).device
            noise = torch.randn(*shape, device=device)
        x = noise
        for i in tqdm(range(self.num_timesteps - 1, -1, -1), disable=not progress, leave=False):
            t = torch.full((shape[0],), i, device=x.device, dtype=torch.long)
            with torch.no_grad():
                out = step(model, x, t, clip_denoised, model_kwargs, **kw)
            yield out
            x = out["sample"]

    def p_sample_loop_progressive(self, model, shape, noise=None, clip_denoised=True, model_kwargs=None,
                                  device=None, progress=False):
        """Yields {"sample", "pred_xstart"} after every DDPM step, from t = T-1 down to 0."""
        yield from self._loop_progressive(self.p_sample, model, shape, noise, clip_denoised, model_kwargs,
                                          device, progress)

    def ddim_sample_loop_progressive(self, model, shape, noise=None, clip_denoised=True, model_kwargs=None,
                                     device=None, progress=False, eta=0.0):
        """Yields {"sample", "pred_xstart"} after every DDIM step: the whole trajectory of a solve."""
        yield from self._loop_progressive(self.ddim_sample, model, shape, noise, clip_denoised, model_kwargs,
                                          device, progress, eta=eta)

    def p_sample_loop(self, model, shape, noise=None, clip_denoised=True, model_kwargs=None, device=None,
                      progress=False):
        for out in self.p_sample_loop_progressive(model, shape, noise, clip_denoised, model_kwargs, device,
                                                  progress):
            pass
        return out["sample"]

    def ddim_sample_loop(self, model, shape, noise=None, clip_denoised=True, model_kwargs=None, device=None,
                         progress=False, eta=0.0):
        for out in self.ddim_sample_loop_progressive(model, shape, noise, clip_denoised, model_kwargs, device,
                                                     progress, eta):
            pass
        return out["sample"]

    # ------------------------------------------------------------------ training

    def training_losses(self, model, x_start, t, model_kwargs=None, noise=None):
        """ε-MSE plus the variational bound term that trains the variance (gradient-stopped mean)."""
        noise = torch.randn_like(x_start) if noise is None else noise
        x_t = self.q_sample(x_start, t, noise)
        model_output = model(x_t, self.model_timesteps(t), **(model_kwargs or {}))
        eps, var_values = torch.split(model_output, x_t.shape[1], dim=1)
        frozen = torch.cat([eps.detach(), var_values], dim=1)
        out = self.p_mean_variance(None, x_t, t, clip_denoised=False, model_output=frozen)
        true_mean = self.q_posterior_mean(x_start, x_t, t)
        true_log_variance = extract(self.posterior_log_variance_clipped, t, x_t.ndim)
        kl = mean_flat(normal_kl(true_mean, true_log_variance, out["mean"], out["log_variance"])) / math.log(2.0)
        nll = -mean_flat(discretized_gaussian_log_likelihood(
            x_start, means=out["mean"], log_scales=0.5 * out["log_variance"])) / math.log(2.0)
        vb = torch.where(t == 0, nll, kl)
        mse = mean_flat((noise - eps) ** 2)
        return {"loss": mse + vb, "mse": mse, "vb": vb}
