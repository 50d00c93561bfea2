"""The text-to-image student on a tiny random PixArt transformer (CPU, offline)."""
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

import pixart
from ard import student_fed_stages
from test_ard import teacher_jump
from test_fast_paths import bf16_sampled_dtypes, bf16_stage_errors
from tiny_pixart import TEXT_CHANNELS, tiny_text, tiny_transformer

K, DEPTH = 4, 3


@pytest.fixture(scope="module")
def teacher():
    return tiny_transformer()


def stages_and_text(batch=3, seed=2):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, K, 4, 8, 8, generator=g), *tiny_text(batch))


def test_stage_zero_at_initialisation_is_the_teacher(teacher):
    student = pixart.PixArtARD(teacher, K, history_layers=2).eval()
    stages, text, mask = stages_and_text()
    t = student.stage_times[:1].expand(len(stages))
    expected = teacher(stages[:, 0], encoder_hidden_states=text, encoder_attention_mask=mask, timestep=t).sample
    with torch.no_grad():
        got = student(stages, text, mask)[:, 0]
        first = student.sample(stages[:, 0], text, mask, steps=1)[:, 0]
    torch.testing.assert_close(got, expected[:, :4], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(first, expected[:, :4], atol=1e-5, rtol=1e-5)


def test_every_stage_at_initialisation_is_the_teacher_at_its_time_without_history(teacher):
    student = pixart.PixArtARD(teacher, K, history_layers=0).eval()
    stages, text, mask = stages_and_text()
    with torch.no_grad():
        got = student(stages, text, mask)
    for k in range(K):
        t = student.stage_times[k:k + 1].expand(len(stages))
        expected = teacher(stages[:, k], encoder_hidden_states=text, encoder_attention_mask=mask, timestep=t).sample
        torch.testing.assert_close(got[:, k], expected[:, :4], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("history_layers", [0, 2])
def test_ddim_heads_start_as_the_teachers_one_jump_solve(teacher, history_layers):
    student = pixart.PixArtARD(teacher, K, history_layers=history_layers, parametrization="ddim").eval()
    stages, text, mask = stages_and_text()
    times = student.stage_times.tolist() + [None]

    def model_fn(x, t, text, mask):
        return teacher(x, encoder_hidden_states=text, encoder_attention_mask=mask, timestep=t).sample
    with torch.no_grad():
        got = student(stages, text, mask)
        for k in range(K if history_layers == 0 else 1):
            state, _ = teacher_jump(model_fn, stages[:, k], times[k], times[k + 1], False, text=text, mask=mask)
            torch.testing.assert_close(got[:, k], state, atol=1e-4, rtol=1e-4)


def perturbed_student(teacher, history_layers, mask="M4", shared_head=False, parametrization="direct"):
    """A student whose stage heads differ, as after training."""
    student = pixart.PixArtARD(teacher, K, history_layers, mask=mask, shared_head=shared_head,
                               parametrization=parametrization).eval()
    with torch.no_grad():
        for head in student.extra_heads:
            head.proj_out.weight.add_(0.1 * torch.randn_like(head.proj_out.weight))
    return student


@pytest.mark.parametrize("parametrization", ["direct", "ddim"])
@pytest.mark.parametrize("history_layers", [0, 1, DEPTH])
@pytest.mark.parametrize("mask", ["M4", "M3"])
def test_cached_sample_equals_teacher_forcing_on_its_own_outputs(teacher, history_layers, mask, parametrization):
    student = perturbed_student(teacher, history_layers, mask, parametrization=parametrization)
    noise, text, text_mask = stages_and_text()[0][:, 0], *tiny_text(3)
    outputs = student.sample(noise, text, text_mask)
    with torch.no_grad():
        forced = student(torch.cat([noise[:, None], outputs[:, :-1]], dim=1), text, text_mask)
    torch.testing.assert_close(forced, outputs, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(outputs[:, 1], outputs[:, 2])


@pytest.mark.parametrize("target", ["state", "x0"])
def test_under_bf16_autocast_heads_and_readouts_add_no_error(teacher, target, monkeypatch):
    """As the DiT student's (test_fast_paths): only the transformer's blocks round, on CPU autocast."""
    student = pixart.PixArtARD(teacher, K, history_layers=2, parametrization="ddim", target=target).eval()
    stages, text, mask = stages_and_text()
    error, bound, dtype = bf16_stage_errors(student, monkeypatch, "cpu", stages, text, mask)
    assert (error <= bound * (1 + 1e-6)).all(), (error, bound)
    assert dtype == torch.float32
    assert bf16_sampled_dtypes(student, monkeypatch, "cpu", stages[:, 0], text, mask) == ([torch.float32] * K,
                                                                                          torch.float32)


@pytest.mark.parametrize("mask", ["M1", "M2", "M3", "M4"])
def test_per_stage_history_equals_the_plain_masked_formulation(teacher, mask):
    """The history blocks' per-stage attention gives what one SDPA over the K·L tokens under the dense
    (K·L)² token mask gives."""
    student = perturbed_student(teacher, DEPTH, mask)
    stages, text, text_mask = stages_and_text()
    with torch.no_grad():
        staged = student(stages, text, text_mask)
        L = student.tokens
        dense = pixart.stage_mask(mask, K).repeat_interleave(L, 0).repeat_interleave(L, 1)
        student.history_keys = lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=dense)
        plain = student(stages, text, text_mask)
    torch.testing.assert_close(staged, plain, rtol=1e-5, atol=1e-5)


def test_without_history_a_stage_ignores_the_others(teacher):
    student = perturbed_student(teacher, history_layers=0)
    stages, text, mask = stages_and_text()
    changed = stages.clone()
    changed[:, [0, 1, 3]] = torch.randn_like(changed[:, [0, 1, 3]])
    with torch.no_grad():
        a, b = student(stages, text, mask), student(changed, text, mask)
    torch.testing.assert_close(a[:, 2], b[:, 2], atol=1e-6, rtol=1e-6)
    assert not torch.allclose(a[:, 0], b[:, 0])


def test_with_history_a_stage_sees_earlier_stages_only(teacher):
    student = perturbed_student(teacher, history_layers=1)
    stages, text, mask = stages_and_text()
    changed = stages.clone()
    changed[:, 0] += 1
    with torch.no_grad():
        a, b = student(stages, text, mask), student(changed, text, mask)
    assert not torch.allclose(a[:, 2], b[:, 2], atol=1e-4)
    changed = stages.clone()
    changed[:, 3] += 1
    with torch.no_grad():
        c = student(changed, text, mask)
    torch.testing.assert_close(a[:, :3], c[:, :3], atol=1e-6, rtol=1e-6)


def test_text_beyond_the_mask_is_ignored_and_text_matters(teacher):
    student = perturbed_student(teacher, history_layers=1)
    stages, text, mask = stages_and_text()
    padded = text.clone()
    padded[~mask] = 5.0
    with torch.no_grad():
        a, b = student(stages, text, mask), student(stages, padded, mask)
        c = student(stages, text + 0.5, mask)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(a, c, atol=1e-3)


def test_teacher_state_dict_loads_strictly_into_the_student(teacher, tmp_path):
    other = tiny_transformer(seed=5)
    other.save_pretrained(tmp_path)
    state_dict = load_file(tmp_path / "diffusion_pytorch_model.safetensors")
    student = perturbed_student(teacher, history_layers=1).load_teacher_weights(state_dict)
    reference = pixart.PixArtARD(other, K, history_layers=1).eval()
    stages, text, mask = stages_and_text()
    with torch.no_grad():
        torch.testing.assert_close(student(stages, text, mask), reference(stages, text, mask))
    del state_dict["proj_out.bias"]
    with pytest.raises(ValueError, match="missing: proj_out.bias"):
        student.load_teacher_weights(state_dict)


def test_shared_head_and_gradients_reach_every_part(teacher):
    student = pixart.PixArtARD(teacher, K, history_layers=1, shared_head=True)
    assert len(student.extra_heads) == 0
    stages, text, mask = stages_and_text()
    student(stages, text, mask).square().mean().backward()
    assert all(p.grad is not None for p in student.parameters() if p.requires_grad)


def test_grad_checkpointing_gives_the_same_gradients(teacher):
    stages, text, mask = stages_and_text()
    grads = []
    for flag in (False, True):
        student = pixart.PixArtARD(teacher, K, history_layers=2).train()
        student.grad_checkpointing = flag
        student(stages, text, mask).square().mean().backward()
        grads.append(student.transformer.transformer_blocks[0].attn1.to_q.weight.grad)
    torch.testing.assert_close(grads[0], grads[1])


def test_student_fed_stages_take_the_text(teacher):
    student = perturbed_student(teacher, history_layers=1)
    stages, text, mask = stages_and_text()
    fed = student_fed_stages(student, stages, text, mask)
    torch.testing.assert_close(fed[:, 1:], student.sample(stages[:, 0], text, mask)[:, :-1])


def test_bad_inputs_and_teachers(teacher):
    student = pixart.PixArtARD(teacher, K, history_layers=1)
    stages, text, mask = stages_and_text()
    with pytest.raises(ValueError, match=r"stages must be \(B, K, C, H, W\) = \(B, 4, 4, 8, 8\)"):
        student(stages[:, :3], text, mask)
    with pytest.raises(ValueError, match=f"text must be .*{TEXT_CHANNELS}"):
        student(stages, text[..., :5], mask)
    with pytest.raises(ValueError, match="text_mask must be"):
        student.sample(stages[:, 0], text, mask[:, :2])
    with pytest.raises(ValueError, match="history_layers must be in"):
        pixart.PixArtARD(teacher, K, history_layers=DEPTH + 1)
    from models import DiT
    with pytest.raises(TypeError, match="must be a diffusers PixArtTransformer2DModel"):
        pixart.PixArtARD(DiT(input_size=8, depth=2, hidden_size=64, num_heads=4), K)


def test_gflops_match_a_flop_counter(teacher):
    """The analytic count against PyTorch's counter (2 FLOPs a multiply-accumulate) on the tiny
    model; attention in the math backend, whose matrix products the counter sees on any device."""
    config = pixart.public_config(teacher.config)
    text, mask = tiny_text(1, tokens=7)
    x = torch.randn(1, 4, 8, 8)
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        teacher(x, encoder_hidden_states=text, encoder_attention_mask=mask, timestep=torch.tensor([500]))
    assert counter.get_total_flops() / 2e9 == pytest.approx(pixart.gflops(config, text_tokens=7), rel=1e-9)
    student = pixart.PixArtARD(teacher, K, history_layers=2).eval()
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        student.sample(x, text, mask)
    expected = pixart.gflops(config, K, 2, text_tokens=7)
    # the formula counts the text's key/value projections in every stage, as the sampler computes them
    assert counter.get_total_flops() / 2e9 == pytest.approx(expected, rel=1e-9)
