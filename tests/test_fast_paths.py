"""The GPU fast paths (torch.compile, bf16 autocast, FlexAttention, CUDA) against the plain eager
fp32 path. Each test runs on the CPU and, where there is one, on a CUDA device."""
import pytest
import torch

from ard import ARD, distillation_loss
from test_ard import inputs, perturbed_dit

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA"))]


@pytest.fixture(autouse=True)
def exact_cuda_matmuls():
    """TF32 off, so that CUDA results are compared at fp32 tolerance."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def student_and_batch(device, history_layers=2, attention="sdpa"):
    student = ARD(perturbed_dit(), num_steps=4, history_layers=history_layers, attention=attention).to(device)
    stages, y = (t.to(device) for t in inputs())
    return student, stages, y


def loss_and_grads(model, parameters, stages, y, targets):
    loss = distillation_loss(model(stages, y), targets)[0]
    return loss.detach(), torch.autograd.grad(loss, parameters)


def relative_error(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.mark.parametrize("device", DEVICES)
def test_cached_sampling_equals_teacher_forcing(device):
    student, stages, y = student_and_batch(device)
    student.eval()
    sampled = student.sample(stages[:, 0], y)
    fed_back = torch.cat([stages[:, :1], sampled[:, :-1]], dim=1)
    torch.testing.assert_close(student(fed_back, y), sampled, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("device", DEVICES)
def test_compiled_student_equals_eager(device):
    """Inductor's forward, backward and K-step sampling compute what eager does (fp32)."""
    torch._dynamo.reset()
    student, stages, y = student_and_batch(device)
    targets = torch.randn_like(stages)
    parameters = [p for p in student.parameters() if p.requires_grad]
    eager_loss, eager_grads = loss_and_grads(student, parameters, stages, y, targets)
    compiled_loss, compiled_grads = loss_and_grads(torch.compile(student), parameters, stages, y, targets)
    torch.testing.assert_close(compiled_loss, eager_loss, rtol=1e-4, atol=1e-6)
    for compiled, eager in zip(compiled_grads, eager_grads):
        torch.testing.assert_close(compiled, eager, rtol=1e-3, atol=1e-5)
    student.eval()
    torch.testing.assert_close(torch.compile(student.sample)(stages[:, 0], y), student.sample(stages[:, 0], y),
                               rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
def test_bf16_training_step_stays_close_to_fp32(device):
    """Under bf16 autocast the loss is within 1% of fp32 and the gradient within 3% (relative norm)."""
    student, stages, y = student_and_batch(device)
    targets = stages + 0.1 * torch.randn_like(stages)
    parameters = [p for p in student.parameters() if p.requires_grad]
    fp32_loss, fp32_grads = loss_and_grads(student, parameters, stages, y, targets)
    with torch.autocast(device, dtype=torch.bfloat16):
        bf16_loss, bf16_grads = loss_and_grads(student, parameters, stages, y, targets)
    assert bf16_loss.dtype == torch.float32  # the loss is taken in fp32 whatever the forward's precision
    assert relative_error(bf16_loss, fp32_loss) < 1e-2
    assert relative_error(torch.cat([g.flatten() for g in bf16_grads]),
                          torch.cat([g.flatten() for g in fp32_grads])) < 3e-2


@pytest.mark.parametrize("device", DEVICES)
def test_compiled_flex_attention_equals_sdpa(device):
    """The FlexAttention block mask, compiled, equals SDPA's boolean mask (forward; on CUDA also the
    gradients: FlexAttention has no CPU backward)."""
    torch._dynamo.reset()
    sdpa, stages, y = student_and_batch(device, history_layers=4)
    flex = ARD(perturbed_dit(), num_steps=4, history_layers=4, attention="flex").to(device)
    compiled = torch.compile(flex)
    if device == "cpu":
        with torch.no_grad():
            torch.testing.assert_close(compiled(stages, y), sdpa(stages, y), rtol=1e-4, atol=1e-5)
        return
    targets = torch.randn_like(stages)
    sdpa_loss, sdpa_grads = loss_and_grads(sdpa, list(sdpa.parameters()), stages, y, targets)
    flex_loss, flex_grads = loss_and_grads(compiled, list(flex.parameters()), stages, y, targets)
    torch.testing.assert_close(flex_loss, sdpa_loss, rtol=1e-4, atol=1e-6)
    for a, b in zip(flex_grads, sdpa_grads):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-5)
