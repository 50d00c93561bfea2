import math
import warnings

import pytest
import torch
import torch.nn.functional as F

from ard import (ARD, MASKS, StageReadout, distillation_loss, gflops, stage_mask, stage_runs,
                 student_fed_stages)
from diffusion.gaussian_diffusion import get_named_beta_schedule
from diffusion.respace import SpacedDiffusion
from models import DiT, StageKeys

K = 4
DEPTH = 4


def perturbed_dit(seed=0, **overrides):
    """A tiny DiT whose zero-initialised layers are perturbed, so every path affects the output."""
    torch.manual_seed(seed)
    config = dict(input_size=8, patch_size=2, in_channels=2, hidden_size=64, depth=DEPTH, num_heads=4, num_classes=10)
    model = DiT(**{**config, **overrides}).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


@pytest.fixture(scope="module")
def teacher():
    return perturbed_dit()


def inputs(batch=3, channels=2, size=8, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, K, channels, size, size, generator=g), torch.randint(0, 10, (batch,), generator=g)


def reference_forward(student, stages, y):
    """The plain formulation: all K·L tokens through every block, conditioning per token, an
    explicit additive mask (block-causal below N, block-diagonal above), attention by hand."""
    B = stages.shape[0]
    x = student.x_embedder(stages.flatten(0, 1)) + student.pos_embed
    L, D = x.shape[1:]
    x = x.reshape(B, K * L, D)
    c = student.conditioning(y).repeat_interleave(L, dim=1)  # (B, K·L, D)
    allowed_below = stage_mask(student.settings["mask"], K).repeat_interleave(L, 0).repeat_interleave(L, 1)
    allowed_above = torch.eye(K, dtype=torch.bool).repeat_interleave(L, 0).repeat_interleave(L, 1)
    for i, block in enumerate(student.blocks):
        allowed = allowed_below if i < student.history_layers else allowed_above
        additive = torch.zeros(K * L, K * L).masked_fill(~allowed, float("-inf"))
        shift1, scale1, gate1, shift2, scale2, gate2 = block.adaLN_modulation(c).chunk(6, dim=-1)
        h = block.norm1(x) * (1 + scale1) + shift1
        H = block.attn.num_heads
        q, k, v = block.attn.qkv(h).view(B, K * L, 3, H, D // H).permute(2, 0, 3, 1, 4)
        weights = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(D // H) + additive, dim=-1)
        x = x + gate1 * block.attn.proj((weights @ v).transpose(1, 2).reshape(B, K * L, D))
        x = x + gate2 * block.mlp(block.norm2(x) * (1 + scale2) + shift2)
    outputs = []
    for k in range(K):
        head = student.heads[0 if len(student.heads) == 1 else k]
        ck = c[:, k * L:(k + 1) * L]
        shift, scale = head.adaLN_modulation(ck).chunk(2, dim=-1)
        tokens = head.linear(head.norm_final(x[:, k * L:(k + 1) * L]) * (1 + scale) + shift)
        p, C2 = student.patch_size, student.out_channels
        h = int(L ** 0.5)
        image = tokens.reshape(B, h, h, p, p, C2).permute(0, 5, 1, 3, 2, 4).reshape(B, C2, h * p, h * p)
        outputs.append(student.readout(image[:, : student.in_channels], stages[:, k], k))
    return torch.stack(outputs, dim=1)


def teacher_jump(model_fn, x, t_from, t_to, clip_x0, **model_kwargs):
    """The teacher's own one-step DDIM from x at timestep t_from to t_to (None: to the final sample),
    through the solver of diffusion/ on the two-point grid {t_to, t_from} (for the final sample, the step
    from the grid's first point, {t_from, t_from + 1}): (next state, x0)."""
    grid, index = ({t_to, t_from}, 1) if t_to is not None else ({t_from, t_from + 1}, 0)
    solver = SpacedDiffusion(grid, get_named_beta_schedule("linear", 1000))
    t = torch.full((x.shape[0],), index)
    out = solver.ddim_sample(model_fn, x, t, clip_denoised=clip_x0, model_kwargs=model_kwargs)
    return out["sample"], out["pred_xstart"]


@pytest.mark.parametrize("target", ["state", "x0"])
@pytest.mark.parametrize("clip_x0", [False, True])
@pytest.mark.parametrize("history_layers", [0, 2])
def test_ddim_heads_start_as_the_teachers_one_jump_solve(teacher, target, clip_x0, history_layers):
    """With ddim heads every stage of an N=0 student (and stage 0 of any) is, at initialisation, the
    teacher's DDIM step from the stage's input to the next stage time (x0 target: that step's x0)."""
    student = ARD(teacher, num_steps=K, history_layers=history_layers, parametrization="ddim", target=target,
                  clip_x0=clip_x0).eval()
    stages, y = inputs()
    stages = stages * 3 if clip_x0 else stages  # inputs whose x0 leaves [-1, 1], so clipping acts
    times = student.stage_times.tolist() + [None]
    with torch.no_grad():
        got = student(stages, y)
        for k in range(K if history_layers == 0 else 1):
            state, x0 = teacher_jump(teacher, stages[:, k], times[k], times[k + 1], clip_x0, y=y)
            torch.testing.assert_close(got[:, k], x0 if target == "x0" else state, rtol=1e-4, atol=1e-5)
    unclipped = ARD(teacher, num_steps=K, history_layers=history_layers, parametrization="ddim", target=target)
    with torch.no_grad():
        assert torch.equal(unclipped(stages, y), got) != clip_x0


def test_clipped_ddim_heads_pass_gradient_to_pixels_outside_the_range():
    """The straight-through clip: values as the solver's clamp, gradient as if unclipped."""
    readout = StageReadout("ddim", "state", [999, 749, 500, 250], clip_x0=True)
    eps = torch.randn(2, 1, 8, 8, requires_grad=True)
    x0 = readout(eps, 3 * torch.randn(2, 1, 8, 8), K - 1)  # the last stage ends at the final sample: x0 itself
    assert x0.abs().max() <= 1 and (x0.abs() == 1).float().mean() > 0.5
    x0.sum().backward()
    alpha_bar = readout.levels[0, K - 1]
    torch.testing.assert_close(eps.grad, torch.full_like(eps, -((1 - alpha_bar) / alpha_bar).sqrt().item()))


@pytest.mark.parametrize("parametrization, history_input", [("direct", "trajectory"), ("ddim", "trajectory"),
                                                             ("direct", "zeros")])
@pytest.mark.parametrize("mask", MASKS)
@pytest.mark.parametrize("history_layers", [0, 1, DEPTH])
def test_cached_sampling_equals_teacher_forcing_on_own_outputs(teacher, mask, history_layers, parametrization,
                                                               history_input):
    student = ARD(teacher, num_steps=K, history_layers=history_layers, mask=mask,
                  parametrization=parametrization, history_input=history_input).eval()
    noise, y = inputs()[0][:, 0], inputs()[1]
    sampled = student.sample(noise, y)
    assert sampled.shape == (3, K, 2, 8, 8)
    stages = torch.cat([noise[:, None], sampled[:, :-1]], dim=1)
    torch.testing.assert_close(student(stages, y), sampled, rtol=1e-5, atol=1e-5)
    assert torch.equal(student.sample(noise, y, steps=2), sampled[:, :2])  # stopped after two stages


@pytest.mark.parametrize("history_layers", [0, 2])
def test_student_fed_stages_are_the_students_own_rollout(teacher, history_layers):
    """x_T, then the student's own free-running outputs; fed them, the teacher-forced forward
    reproduces the rollout it came from (the explicit rollout: sample, then forward)."""
    student = ARD(teacher, num_steps=K, history_layers=history_layers).train()
    stages, y = inputs()
    fed = student_fed_stages(student, stages, y)
    rollout = student.sample(stages[:, 0], y)
    assert torch.equal(fed[:, 0], stages[:, 0])
    assert torch.equal(fed[:, 1:], rollout[:, :-1])
    assert not fed.requires_grad
    torch.testing.assert_close(student(fed, y), rollout, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mask", MASKS)
@pytest.mark.parametrize("history_layers", [0, 2, DEPTH])
@pytest.mark.parametrize("shared_head, parametrization", [(False, "direct"), (True, "direct"), (False, "ddim")])
def test_efficient_forward_equals_plain_masked_formulation(teacher, mask, history_layers, shared_head,
                                                           parametrization):
    student = ARD(teacher, num_steps=K, history_layers=history_layers, mask=mask, shared_head=shared_head,
                  parametrization=parametrization).eval()
    with torch.no_grad():  # heads start equal; make them differ so a wrong head index shows
        for head in student.heads:
            head.linear.bias.add_(torch.randn_like(head.linear.bias))
    stages, y = inputs()
    with torch.no_grad():
        torch.testing.assert_close(student(stages, y), reference_forward(student, stages, y), rtol=1e-5, atol=1e-5)


def dense_token_mask(mask, tokens):
    """The plain formulation's (K·L, K·L) boolean mask of a stage mask variant."""
    return stage_mask(mask, K).repeat_interleave(tokens, 0).repeat_interleave(tokens, 1)


def test_stage_runs_are_the_spans_of_visible_stages():
    assert stage_runs(stage_mask("M4", K)) == [[(0, 1)], [(0, 2)], [(0, 3)], [(0, 4)]]
    assert stage_runs(stage_mask("M2", K)) == [[(0, 1)], [(0, 2)], [(1, 3)], [(2, 4)]]
    assert stage_runs(stage_mask("M3", K)) == [[(0, 1)], [(0, 2)], [(0, 1), (2, 3)], [(0, 1), (3, 4)]]
    assert stage_runs(stage_mask("M1", K)) == [[(k, k + 1)] for k in range(K)]


@pytest.mark.parametrize("mask", MASKS)
def test_per_stage_attention_equals_dense_masked_sdpa(mask):
    """StageKeys (one SDPA per stage over the keys it sees) computes the (K·L)²-masked SDPA, gradients too."""
    L = 5
    q, k, v = (torch.randn(2, 3, K * L, 8, requires_grad=True) for _ in range(3))
    staged = StageKeys(stage_runs(stage_mask(mask, K)), L)(q, k, v)
    dense = F.scaled_dot_product_attention(q, k, v, attn_mask=dense_token_mask(mask, L))
    torch.testing.assert_close(staged, dense, rtol=1e-5, atol=1e-6)
    weights = torch.randn_like(dense)
    for a, b in zip(torch.autograd.grad((staged * weights).sum(), (q, k, v)),
                    torch.autograd.grad((dense * weights).sum(), (q, k, v))):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_flex_attention_equals_sdpa(teacher):
    stages, y = inputs()
    sdpa = ARD(teacher, num_steps=K, history_layers=DEPTH)
    flex = ARD(teacher, num_steps=K, history_layers=DEPTH, attention="flex")
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # eager FlexAttention warns that it is unfused
        torch.testing.assert_close(flex(stages, y), sdpa(stages, y), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("history_layers", [0, 2, DEPTH])
def test_stage_zero_is_the_teacher_at_initialisation(teacher, history_layers):
    student = ARD(teacher, num_steps=K, history_layers=history_layers).eval()
    stages, y = inputs()
    with torch.no_grad():
        expected = teacher(stages[:, 0], torch.full((3,), 999), y)[:, :2]
        torch.testing.assert_close(student(stages, y)[:, 0], expected, rtol=1e-5, atol=1e-5)
    assert student.stage_times.tolist() == [999, 749, 500, 250]


def stage_changes(student, changed_stage):
    stages, y = inputs()
    altered = stages.clone()
    altered[:, changed_stage] += 1.0
    with torch.no_grad():
        diff = (student(stages, y) - student(altered, y)).abs().amax(dim=(0, 2, 3, 4))
    return diff > 1e-6


def test_step_distillation_has_no_cross_stage_dependence(teacher):
    student = ARD(teacher, num_steps=K, history_layers=0)
    for changed in range(K):
        assert stage_changes(student, changed).tolist() == [k == changed for k in range(K)]


@pytest.mark.parametrize("history_layers", [1, DEPTH])
def test_block_causal_history_flows_forward_only(teacher, history_layers):
    student = ARD(teacher, num_steps=K, history_layers=history_layers, mask="M4")
    for changed in range(K):
        assert stage_changes(student, changed).tolist() == [k >= changed for k in range(K)]


@pytest.mark.parametrize("mask", ["M4", "M3"])
def test_zero_history_is_the_student_on_zeroed_earlier_stages(teacher, mask):
    """The control's stage k equals the student itself fed zeros in place of stages < k: its history tokens
    are stages computed from zero inputs; so no earlier stage's content reaches a stage."""
    control = ARD(teacher, num_steps=K, history_layers=2, mask=mask, history_input="zeros").eval()
    plain = ARD(teacher, num_steps=K, history_layers=2, mask=mask).eval()
    stages, y = inputs()
    with torch.no_grad():
        got = control(stages, y)
        for k in range(K):
            zeroed = stages.clone()
            zeroed[:, :k] = 0
            torch.testing.assert_close(got[:, k], plain(zeroed, y)[:, k], rtol=1e-5, atol=1e-5)
        assert not torch.allclose(got[:, 1:], plain(stages, y)[:, 1:], atol=1e-4)
    for changed in range(K):
        assert stage_changes(control, changed).tolist() == [k == changed for k in range(K)]


def test_mask_variants():
    assert stage_mask("M1", 3).tolist() == [[1, 0, 0], [0, 1, 0], [0, 0, 1]]
    assert stage_mask("M2", 3).tolist() == [[1, 0, 0], [1, 1, 0], [0, 1, 1]]
    assert stage_mask("M3", 3).tolist() == [[1, 0, 0], [1, 1, 0], [1, 0, 1]]
    assert stage_mask("M4", 3).tolist() == [[1, 0, 0], [1, 1, 0], [1, 1, 1]]


def test_gradient_checkpointing_gives_the_same_gradients(teacher):
    stages, y = inputs()
    grads = []
    for checkpointing in (False, True):
        student = ARD(teacher, num_steps=K, history_layers=2).train()
        student.grad_checkpointing = checkpointing
        distillation_loss(student(stages, y), stages)[0].backward()
        grads.append(student.blocks[0].attn.qkv.weight.grad)
    torch.testing.assert_close(grads[0], grads[1])


def test_distillation_loss_is_the_mean_of_per_stage_mse():
    pred, target = torch.randn(2, K, 1, 4, 4), torch.randn(2, K, 1, 4, 4)
    loss, per_stage = distillation_loss(pred, target)
    expected = [F.mse_loss(pred[:, k], target[:, k]) for k in range(K)]
    torch.testing.assert_close(per_stage, torch.stack(expected))
    torch.testing.assert_close(loss, torch.stack(expected).mean())


XL2_256 = dict(input_size=32, patch_size=2, in_channels=4, hidden_size=1152, depth=28, num_heads=16, mlp_ratio=4.0,
               learn_sigma=True)


@pytest.mark.parametrize("steps, history, mask, paper", [
    (1, 0, "M4", 118.6),  # the teacher, DiT's Gflops
    (4, 0, "M4", 474.4), (4, 6, "M4", 479.9), (4, 6, "M2", 477.1), (4, 6, "M3", 477.1), (4, 28, "M4", 500.2),
    (2, 0, "M4", 237.2), (2, 6, "M4", 238.1),
])
def test_flops_match_the_paper(steps, history, mask, paper):
    assert gflops(XL2_256, steps, history, mask) == pytest.approx(paper, rel=0.005)


def test_history_overhead_is_below_target():
    assert gflops(XL2_256, 4, 6) / gflops(XL2_256, 4, 0) - 1 <= 0.012


@pytest.mark.parametrize("kwargs, message", [
    (dict(num_steps=0), "num_steps"),
    (dict(history_layers=DEPTH + 1), "history_layers"),
    (dict(history_layers=-1), "history_layers"),
    (dict(stage_times=[999, 500, 749, 250]), "strictly decreasing"),
    (dict(stage_times=[999, 500]), "expected 4 stage times"),
    (dict(mask="M5"), "unknown mask"),
    (dict(attention="xformers"), "attention"),
    (dict(parametrization="eps"), "parametrization must be one of direct, ddim"),
    (dict(target="v"), "target must be one of state, x0"),
    (dict(history_input="noise"), "history_input must be one of trajectory, zeros"),
])
def test_bad_settings_are_rejected(teacher, kwargs, message):
    with pytest.raises(ValueError, match=message):
        ARD(teacher, **{"num_steps": K, "history_layers": 2, **kwargs})


@pytest.mark.parametrize("shape", [(2, 3, 2, 8, 8), (2, 4, 1, 8, 8), (2, 4, 2, 16, 8), (2, 4, 2, 8, 16)])
def test_stages_of_the_wrong_shape_are_rejected(teacher, shape):
    student = ARD(teacher, num_steps=K, history_layers=2)
    with pytest.raises(ValueError, match=r"stages must be \(B, K, C, H, W\) = \(B, 4, 2, 8, 8\)"):
        student(torch.zeros(shape), torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match=r"noise must be \(B, C, H, W\)"):
        student.sample(torch.zeros(shape[:1] + shape[2:]) if shape[1] == K else torch.zeros(2, 2, 8, 4),
                       torch.zeros(2, dtype=torch.long))
