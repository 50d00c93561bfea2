"""Flow-matching teachers through the shared scripts: loading SiT's and REPA's layouts (built here, tiny and random),
the teacher family and time convention checked by every reader."""
import argparse
import logging
import urllib.error

import pytest
import torch

from ard import ARD
from models import DiT, create_dit, load_teacher
from transport import CONVENTIONS, GuidedVelocity, solve_progressive, student_steps, time_grid


def random_state(model, seed):
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(v.shape, generator=g) for k, v in model.state_dict().items()}


def repa_layout(seed=0):
    """REPA's SiT state dict for 8x8 pixels: DiT's keys without learned sigma, plus one projector MLP (6 tensors)."""
    state = random_state(create_dit("DiT-S/8", 8, latent=False, in_channels=3, num_classes=10, learn_sigma=False), seed)
    g = torch.Generator().manual_seed(seed + 1)
    for i, (fan_in, fan_out) in zip((0, 2, 4), ((384, 64), (64, 64), (64, 32))):
        state[f"projectors.0.{i}.weight"] = torch.randn(fan_out, fan_in, generator=g)
        state[f"projectors.0.{i}.bias"] = torch.randn(fan_out, generator=g)
    return state


PIXELS = dict(model="DiT-S/8", image_size=8, vae="none", num_classes=10)


@pytest.fixture
def sit_file(tmp_path, monkeypatch):
    """The official SiT name, cached in pretrained_models/: DiT's learned-sigma layout (a DiT-S/8 stands in)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(torch.hub, "download_url_to_file", lambda *a, **k: pytest.fail("downloaded a cached file"))
    state = random_state(create_dit("DiT-S/8", 256), 1)
    (tmp_path / "pretrained_models").mkdir()
    torch.save(state, tmp_path / "pretrained_models" / "SiT-XL-2-256x256.pt")
    return state


def test_sit_checkpoint_loads_strictly_as_a_flow_teacher_in_sits_convention(sit_file):
    net, info = load_teacher("SiT-XL-2-256x256.pt", model="DiT-S/8", family="flow")
    assert info["teacher_family"] == "flow" and info["time_convention"] == "sit"
    assert net.learn_sigma and info["image_size"] == 256
    assert all(torch.equal(net.state_dict()[k], v) for k, v in sit_file.items())


def test_sit_checkpoint_given_as_a_ddpm_teacher_stops(sit_file):
    with pytest.raises(ValueError, match=r"SiT-XL-2-256x256.pt is a flow-matching \(velocity\) teacher, given as a "
                                         r"DDPM \(ε-prediction\) one: pass --teacher-family flow"):
        load_teacher("SiT-XL-2-256x256.pt", model="DiT-S/8")
    with pytest.raises(ValueError, match="uses the 'sit' time convention, given as 'repa'"):
        load_teacher("SiT-XL-2-256x256.pt", model="DiT-S/8", family="flow", time_convention="repa")


def test_dit_checkpoint_given_as_a_flow_teacher_stops(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "pretrained_models").mkdir()
    torch.save(random_state(create_dit("DiT-S/8", 256), 1), tmp_path / "pretrained_models" / "DiT-XL-2-256x256.pt")
    with pytest.raises(ValueError, match=r"is a DDPM \(ε-prediction\) teacher, given as a flow-matching \(velocity\) "
                                         r"one: pass --teacher-family ddpm"):
        load_teacher("DiT-XL-2-256x256.pt", model="DiT-S/8", family="flow")


def test_sit_download_names_its_url_when_offline(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    urls = []

    def offline(url, dst, *args, **kwargs):
        urls.append(url)
        raise urllib.error.URLError("offline")
    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(FileNotFoundError, match="place the file at pretrained_models/SiT-XL-2-256x256.pt"):
        load_teacher("SiT-XL-2-256x256.pt", family="flow")
    assert urls == ["https://www.dl.dropboxusercontent.com/scl/fi/as9oeomcbub47de5g4be0/SiT-XL-2-256.pt"
                    "?rlkey=uxzxmpicu46coq3msb17b9ofa&dl=0"]


@pytest.mark.parametrize("wrapped", [True, False])
def test_repa_checkpoint_loads_without_its_projectors_named_in_the_log(tmp_path, caplog, wrapped):
    state = repa_layout()
    path = tmp_path / "last.pt"
    checkpoint = {"model": state, "ema": state, "opt": {}, "args": argparse.Namespace(model="SiT-XL/2"),
                  "steps": 4_000_000} if wrapped else state
    torch.save(checkpoint, path)
    with caplog.at_level(logging.WARNING, logger="models"):
        net, info = load_teacher(str(path), family="flow", **PIXELS)
    assert info["time_convention"] == "repa" and not net.learn_sigma
    kept = {k: v for k, v in state.items() if not k.startswith("projectors.")}
    assert set(net.state_dict()) == set(kept) and len(state) - len(kept) == 6
    assert all(torch.equal(net.state_dict()[k], v) for k, v in kept.items())
    assert "dropping its 6 projector tensors" in caplog.text and "projectors.0.4.weight" in caplog.text
    with pytest.raises(ValueError, match="last.pt is a flow-matching"):
        load_teacher(str(path), **PIXELS)


def test_our_checkpoints_record_their_family(tmp_path):
    model = create_dit("DiT-S/8", 8, latent=False, in_channels=3, num_classes=10, learn_sigma=False)
    args = {"stage": "teacher", "dit": model.config, "image_size": 8, "vae": "none"}
    flow, ddpm = tmp_path / "flow.pt", tmp_path / "ddpm.pt"
    torch.save({"ema": model.state_dict(), "args": dict(args, teacher_family="flow", time_convention="repa")}, flow)
    torch.save({"ema": model.state_dict(), "args": args}, ddpm)  # written before families: DDPM
    assert load_teacher(str(flow), family="flow")[1]["time_convention"] == "repa"
    with pytest.raises(ValueError, match="flow.pt is a flow-matching"):
        load_teacher(str(flow))
    with pytest.raises(ValueError, match="ddpm.pt is a DDPM"):
        load_teacher(str(ddpm), family="flow")


def test_a_bare_flow_state_dict_needs_its_time_convention(tmp_path):
    path = tmp_path / "bare.pt"
    torch.save(random_state(create_dit("DiT-S/8", 8, latent=False, in_channels=3, num_classes=10), 2), path)
    with pytest.raises(ValueError, match="does not say its time convention: pass --time-convention"):
        load_teacher(str(path), family="flow", **PIXELS)
    assert load_teacher(str(path), family="flow", time_convention="sit", **PIXELS)[1]["time_convention"] == "sit"


# ---------------------------------------------------------------------------- flow students

def perturbed_dit(seed=0, learn_sigma=True):
    torch.manual_seed(seed)
    model = DiT(input_size=8, patch_size=2, in_channels=2, hidden_size=64, depth=4, num_heads=4, num_classes=10,
                learn_sigma=learn_sigma).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def flow_stage_times(convention, num_steps=4, teacher_steps=8, shift=1.0):
    sigmas = time_grid(teacher_steps, shift)[student_steps(num_steps, teacher_steps)]
    return [CONVENTIONS[convention].model_time(s) for s in sigmas.tolist()]


def stage_inputs(batch=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 4, 2, 8, 8, generator=g), torch.randint(0, 10, (batch,), generator=g)


@pytest.mark.parametrize("convention", list(CONVENTIONS))
@pytest.mark.parametrize("target", ["state", "x0"])
@pytest.mark.parametrize("history_layers", [0, 2])
def test_euler_heads_start_as_the_teachers_one_jump_solve(convention, target, history_layers):
    """Every stage of an N=0 flow student (stage 0 of any) is, at initialisation, one Euler step of the teacher's
    own solver from the stage's input to the next stage's noise level (x0 target: that step's x0)."""
    teacher, times = perturbed_dit(), flow_stage_times(convention, shift=3.0)
    student = ARD(teacher, num_steps=4, history_layers=history_layers, stage_times=times, parametrization="euler",
                  target=target, time_convention=convention).eval()
    stages, y = stage_inputs()
    sigmas = [CONVENTIONS[convention].model_time(t) for t in times] + [0.0]
    velocity = GuidedVelocity(teacher, CONVENTIONS[convention])
    with torch.no_grad():
        got = student(stages, y)
    for k in range(4 if history_layers == 0 else 1):
        step, = solve_progressive(velocity, stages[:, k], sigmas[k:k + 2], y)
        expected = step["pred_xstart"] if target == "x0" else step["sample"]
        torch.testing.assert_close(got[:, k], expected.float(), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("mask", ["M1", "M3", "M4"])
@pytest.mark.parametrize("history_layers", [0, 1, 4])
def test_flow_students_cached_sampling_equals_teacher_forcing(mask, history_layers):
    student = ARD(perturbed_dit(learn_sigma=False), num_steps=4, history_layers=history_layers, mask=mask,
                  stage_times=flow_stage_times("sit"), parametrization="euler", time_convention="sit").eval()
    stages, y = stage_inputs()
    sampled = student.sample(stages[:, 0], y)
    forced = student(torch.cat([stages[:, :1], sampled[:, :-1]], dim=1), y)
    torch.testing.assert_close(forced, sampled, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kwargs, message", [
    (dict(stage_times=[1.0, 0.75, 0.5, 1.25]), r"stage times must lie in \[0, 1\]"),
    (dict(stage_times=[1.0, 0.75, 0.5, -0.25]), r"stage times must lie in \[0, 1\]"),
    (dict(stage_times=[1.0, 0.75, 0.5, 0.25], time_convention="sit"), "must go from noise to data \\('sit'"),
    (dict(stage_times=None), "a flow student's stage times come from its trajectories"),
    (dict(parametrization="ddim"), "parametrization 'ddim' reads a ddpm teacher's output; this student's teacher is "
                                   "a flow teacher"),
    (dict(time_convention="edm"), "time convention must be one of sit, repa"),
])
def test_bad_flow_student_settings(kwargs, message):
    settings = dict(num_steps=4, history_layers=1, stage_times=flow_stage_times("repa"), parametrization="euler",
                    time_convention="repa")
    with pytest.raises(ValueError, match=message):
        ARD(perturbed_dit(), **{**settings, **kwargs})


def test_euler_heads_need_a_flow_teacher():
    with pytest.raises(ValueError, match="parametrization 'euler' reads a flow teacher's output; this student's "
                                         "teacher is a ddpm teacher"):
        ARD(perturbed_dit(), num_steps=4, history_layers=1, parametrization="euler")
