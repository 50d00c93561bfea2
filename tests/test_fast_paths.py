"""The GPU fast paths (torch.compile, bf16 autocast, FlexAttention, CUDA) against the plain eager
fp32 path. Each test runs on the CPU and, where there is one, on a CUDA device."""
import pytest
import torch

from ard import ARD, distillation_loss
from test_ard import inputs, perturbed_dit
from test_flow_teachers import flow_stage_times

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


def recorded_heads(student, monkeypatch):
    """A list that receives the arguments of every call of student.head, and the head itself."""
    calls, head = [], student.head

    def recording_head(*args):
        calls.append(args)
        return head(*args)
    monkeypatch.setattr(student, "head", recording_head)
    return calls, head


def rms_per_stage(a, b):
    return (a.float() - b.float()).pow(2).mean(dim=(0, 2, 3, 4)).sqrt()


def bf16_stage_errors(student, monkeypatch, device, stages, *condition):
    """Per stage, the RMS error of the teacher-forced prediction under real bf16 autocast against fp32, and the
    error that bf16 rounding in the backbone explains: that of the fp32 heads and readouts applied to the tokens
    (and conditioning) the bf16 backbone hands them. Heads and readouts that add no error of their own reach
    the second exactly."""
    with torch.no_grad():
        fp32 = student(stages, *condition)
        calls, head = recorded_heads(student, monkeypatch)
        with torch.autocast(device, dtype=torch.bfloat16):
            bf16 = student(stages, *condition)
        explained = torch.stack([head(*(a.float() if torch.is_tensor(a) else a for a in args)) for args in calls], 1)
    error, bound = rms_per_stage(bf16, fp32), rms_per_stage(explained, fp32)
    print("bf16 RMS error per stage:", " ".join(f"{e:.3g} (bound {b:.3g})" for e, b in zip(error, bound)))
    assert (bound > 0).all()  # autocast did round the backbone
    return error, bound, bf16.dtype


def bf16_sampled_dtypes(student, monkeypatch, device, noise, *condition):
    """(the dtypes of the stage inputs that `sample` passes its heads under real bf16 autocast, the samples')."""
    calls, _ = recorded_heads(student, monkeypatch)
    with torch.autocast(device, dtype=torch.bfloat16):
        sampled = student.sample(noise, *condition)
    return [args[-1].dtype for args in calls], sampled.dtype


BF16_STUDENTS = {"ddim-state": dict(parametrization="ddim"), "ddim-x0": dict(parametrization="ddim", target="x0"),
                 "direct": dict(parametrization="direct"),
                 "euler-x0": dict(parametrization="euler", target="x0", stage_times=flow_stage_times("sit", shift=3.0),
                                  time_convention="sit")}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("student", list(BF16_STUDENTS))
def test_under_bf16_autocast_heads_and_readouts_add_no_error(device, student, monkeypatch):
    """Under bf16 autocast only the backbone rounds: a stage's error is at most what the bf16 backbone's tokens
    explain through the fp32 head and readout (a ddim readout multiplies a bf16 head's rounding by up to 157),
    and `sample` passes fp32 states between its stages."""
    student = ARD(perturbed_dit(), num_steps=4, history_layers=2, **BF16_STUDENTS[student]).to(device).eval()
    stages, y = (t.to(device) for t in inputs())
    error, bound, dtype = bf16_stage_errors(student, monkeypatch, device, stages, y)
    assert (error <= bound * (1 + 1e-6)).all(), (error, bound)
    assert dtype == torch.float32
    assert bf16_sampled_dtypes(student, monkeypatch, device, stages[:, 0], y) == ([torch.float32] * 4, torch.float32)


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
