"""Flow-matching teachers through the shared scripts: loading SiT's and REPA's layouts (built here, tiny and random),
the teacher family and time convention checked by every reader."""
import argparse
import json
import logging
import math
import os
import shutil
import urllib.error

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import extract_trajectories as et
import sample
import sample_ddp
import test_extract as te
import test_train as tt

from ard import ARD, load_student
from utils import index_noise_and_labels
from models import DiT, create_dit, load_teacher
from transport import CONVENTIONS, GuidedVelocity, solve_progressive, student_steps, time_grid


def random_state(model, seed):
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(v.shape, generator=g) for k, v in model.state_dict().items()}


def repa_layout(seed=0, num_classes=10):
    """REPA's SiT state dict for 8x8 pixels: DiT's keys without learned sigma, plus one projector MLP (6 tensors)."""
    state = random_state(create_dit("DiT-S/8", 8, latent=False, in_channels=3, num_classes=num_classes,
                                    learn_sigma=False), seed)
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
    checkpoint = repa_training_dict(state) if wrapped else state
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


def repa_training_dict(state):
    """What REPA's own train.py saves."""
    return {"model": state, "ema": state, "opt": {}, "args": argparse.Namespace(model="SiT-XL/2"), "steps": 4_000_000}


def test_repas_training_dict_samples_as_its_bare_weights_in_sample_and_sample_ddp(tmp_path, capsys):
    """sample.py and sample_ddp.py identify REPA's training dict as load_teacher does (they read its args as ours and
    crashed on its argparse.Namespace): its images equal those of the bare EMA weights without projectors."""
    state = repa_layout(num_classes=1000)  # sample.py's official-file flags: ImageNet's classes
    weights = {k: v for k, v in state.items() if not k.startswith("projectors.")}
    torch.save(repa_training_dict(state), tmp_path / "last.pt")
    torch.save(weights, tmp_path / "bare.pt")
    flags = ["--model", "DiT-S/8", "--image-size", "8", "--vae", "none", "--teacher-family", "flow",
             "--time-convention", "repa", "--num-sampling-steps", "2", "--cfg-scale", "1", "--device", "cpu"]
    for name in ("last", "bare"):
        sample.main(["--ckpt", str(tmp_path / f"{name}.pt"), "--out", str(tmp_path / f"{name}.png"), *flags])
        sample_ddp.main(["--ckpt", str(tmp_path / f"{name}.pt"), "--out", str(tmp_path / f"{name}.npz"),
                         "--num-fid-samples", "3", *flags])
    assert (tmp_path / "last.png").read_bytes() == (tmp_path / "bare.png").read_bytes()
    assert np.array_equal(np.load(tmp_path / "last.npz")["arr_0"], np.load(tmp_path / "bare.npz")["arr_0"])
    assert "teacher (2 steps): 3 images" in capsys.readouterr().out


def test_export_refuses_repas_training_dict_in_one_line(tmp_path):
    torch.save(repa_training_dict(repa_layout()), tmp_path / "last.pt")
    with pytest.raises(ValueError, match=r"^--export takes one of our checkpoints; .*last.pt is a REPA file$"):
        tt.train.export(str(tmp_path / "last.pt"), str(tmp_path / "out.safetensors"))


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


# ---------------------------------------------------------------------------- flow trajectories

FLOW = ["--teacher-family", "flow", "--solver", "heun", "--time-shift", "2", "--guidance-interval", "0", "0.7",
        "--guidance-channels", "1"]


def make_flow_teacher(path, convention="sit", seed=0):
    """One of our flow teacher checkpoints: a tiny velocity DiT (no learned sigma), perturbed off adaLN-Zero."""
    g = torch.Generator().manual_seed(seed)
    m = DiT(input_size=8, patch_size=2, in_channels=1, hidden_size=64, depth=2, num_heads=4, num_classes=10,
            learn_sigma=False)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    torch.save({"ema": m.state_dict(), "args": {"stage": "teacher", "dit": m.config, "image_size": 8, "vae": "none",
                                                "teacher_family": "flow", "time_convention": convention}}, path)
    return m.eval()


@pytest.fixture(scope="module")
def flow_teacher(tmp_path_factory):
    path = tmp_path_factory.mktemp("flow_teacher") / "teacher.pt"
    return str(path), make_flow_teacher(path)


@pytest.fixture(scope="module")
def flow_single(flow_teacher, tmp_path_factory):
    out = tmp_path_factory.mktemp("flow_single") / "traj"
    et.main(te.argv(flow_teacher[0], out, *FLOW))
    return str(out)


def test_flow_meta_records_the_solve(flow_single):
    meta = json.load(open(os.path.join(flow_single, "meta.json")))
    sigmas = time_grid(te.S, 2.0)[[0, 2, 5, 8]].tolist()  # round(k·10/4): steps 0, 2, 5, 8 (round half to even)
    expected = dict(teacher_family="flow", solver="heun", last_step="heun", time_grid="shifted", time_shift=2.0,
                    time_convention="sit", guidance_interval=[0.0, 0.7], guidance_channels=1, clip_denoised=False,
                    boundary_steps=[0, 2, 5, 8], boundary_sigmas=sigmas, boundary_times=[1 - s for s in sigmas],
                    format=et.FORMAT_VERSION)
    assert {k: meta[k] for k in expected} == expected


def test_flow_points_are_the_teachers_own_solve(flow_single, flow_teacher):
    indices = range(te.SHARD_SIZE, 2 * te.SHARD_SIZE)
    noise, labels = index_noise_and_labels(te.SEED, indices, te.SHAPE, te.NUM_CLASSES, te.LABELS)
    velocity = GuidedVelocity(flow_teacher[1], CONVENTIONS["sit"], te.CFG, 1, (0.0, 0.7))
    steps = list(solve_progressive(velocity, noise, time_grid(te.S, 2.0), labels, "heun"))
    shard = load_file(os.path.join(flow_single, te.shard_name(1)))
    te.assert_fp16_close(shard["state"][:, 0], noise)
    for k, step in enumerate([2, 5, 8]):
        te.assert_fp16_close(shard["state"][:, k + 1], steps[step - 1]["sample"])
        te.assert_fp16_close(shard["x0"][:, k], steps[step]["pred_xstart"])
    te.assert_fp16_close(shard["state"][:, -1], steps[-1]["sample"])
    te.assert_clearly_differs(shard["state"][:, -1], steps[-2]["sample"])


def test_flow_extraction_on_two_processes_writes_the_same_bytes_and_resumes(flow_single, flow_teacher, tmp_path,
                                                                           monkeypatch):
    out = tmp_path / "ddp"
    proc = te.torchrun_extraction(te.argv(flow_teacher[0], out, *FLOW))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert te.contents(out) == te.contents(flow_single)
    os.remove(out / te.shard_name(2))
    recorder = te.Recorder()
    monkeypatch.setattr(et, "atomic_write", recorder)
    et.main(te.argv(flow_teacher[0], out, *FLOW))
    assert recorder.shards() == [te.shard_name(2)] and te.contents(out) == te.contents(flow_single)


@pytest.mark.parametrize("extra, message", [
    ([], "teacher.pt is a flow-matching \\(velocity\\) teacher, given as a DDPM"),
    (["--teacher-family", "flow", "--time-convention", "repa"], "uses the 'sit' time convention, given as 'repa'"),
])
def test_flow_teacher_mismatches_stop_before_solving(flow_teacher, tmp_path, monkeypatch, extra, message):
    monkeypatch.setattr(et, "solve_progressive", te.must_not_solve)
    monkeypatch.setattr(et, "solve_trajectories", te.must_not_solve)
    with pytest.raises(ValueError, match=message):
        et.main(te.argv(flow_teacher[0], tmp_path / "traj", *extra))


def test_ddpm_teacher_given_as_flow_stops(tmp_path):
    te.make_teacher(tmp_path / "ddpm.pt")
    with pytest.raises(ValueError, match="ddpm.pt is a DDPM \\(ε-prediction\\) teacher, given as a flow-matching"):
        et.main(te.argv(tmp_path / "ddpm.pt", tmp_path / "traj", "--teacher-family", "flow"))


@pytest.mark.parametrize("extra, message", [
    (["--solver", "heun"], "--solver is for flow teachers"),
    (["--teacher-family", "flow", "--guidance-interval", "0.8", "0.2"], "--guidance-interval must satisfy"),
    (["--teacher-family", "flow", "--time-shift", "0"], "--time-shift must be positive"),
    (["--teacher-family", "flow", "--last-step", "heun"], "--last-step heun is for --solver heun, got --solver euler"),
    (["--teacher-family", "flow", "--solver", "dopri5"], "invalid choice: 'dopri5'"),  # trajectories need a grid
])
def test_bad_flow_arguments(flow_teacher, tmp_path, capsys, extra, message):
    with pytest.raises(SystemExit):
        et.parse_args(te.argv(flow_teacher[0], tmp_path / "traj", *extra))
    assert message in capsys.readouterr().err


# ---------------------------------------------------------------------------- the pipeline on a flow teacher

FLOW_TEACHER = ["--teacher-family", "flow", "--time-convention", "repa"]


@pytest.fixture(scope="module")
def flow_pipeline(tmp_path_factory):
    """A tiny flow teacher trained 4 steps on the digits, and 32 Euler trajectories of it (K=4, 8 steps)."""
    root = tmp_path_factory.mktemp("flow_pipeline")
    teacher = tt.ckpt(tt.run(tt.teacher_argv(root / "teacher", "--iterations", 4, "--ckpt-every", 4,
                                             *FLOW_TEACHER)), 4)
    traj = str(root / "traj")
    et.main(["--ckpt", teacher, "--out", traj, "--num-samples", "32", "--shard-size", "16", "--batch-size", "16",
             "--teacher-steps", "8", "--teacher-family", "flow", "--time-shift", "3"])
    return teacher, traj


def test_flow_teacher_trains_with_the_flow_matching_loss(flow_pipeline):
    args = tt.load(flow_pipeline[0])["args"]
    assert (args["teacher_family"], args["time_convention"], args["dit"]["learn_sigma"]) == ("flow", "repa", False)
    net, info = load_teacher(flow_pipeline[0], family="flow")
    assert info["time_convention"] == "repa"
    losses = [row["loss"] for _, row in tt.log_steps(os.path.dirname(os.path.dirname(flow_pipeline[0])))]
    assert len(losses) == 4 and all(math.isfinite(v) for v in losses)


def test_flow_student_resumes_bit_identically_and_records_its_teacher(flow_pipeline, tmp_path):
    teacher, traj = flow_pipeline

    def argv(results):
        return tt.ard_argv(teacher, traj, results, "--teacher-family", "flow", "--parametrization", "euler")
    whole = tt.run(argv(tmp_path / "whole") + ["--iterations", 6, "--ckpt-every", 6])
    part = tt.run(argv(tmp_path / "part") + ["--iterations", 3, "--ckpt-every", 3])
    tt.run(["--resume", part, "--iterations", 6])
    a, b = tt.load(tt.ckpt(whole, 6)), tt.load(tt.ckpt(part, 6))
    tt.assert_same_training_state(a, b)
    meta = json.load(open(os.path.join(traj, "meta.json")))
    assert b["args"]["stage_times"] == meta["boundary_times"] and b["args"]["time_convention"] == "repa"
    assert b["args"]["teacher_family"] == "flow" and b["args"]["parametrization"] == "euler"
    student, _ = load_student(tt.ckpt(part, 6))
    assert student.readout.convention == CONVENTIONS["repa"]


def test_flow_trajectories_with_a_ddpm_teacher_or_readout_stop(flow_pipeline, tmp_path):
    teacher, traj = flow_pipeline
    with pytest.raises(ValueError, match="is a flow-matching \\(velocity\\) teacher, given as a DDPM"):
        tt.run(tt.ard_argv(teacher, traj, tmp_path, "--iterations", 1))
    with pytest.raises(ValueError, match="parametrization 'ddim' reads a ddpm teacher's output"):
        tt.run(tt.ard_argv(teacher, traj, tmp_path, "--iterations", 1, "--teacher-family", "flow",
                           "--parametrization", "ddim"))


def test_trajectories_of_another_convention_or_grid_stop(flow_pipeline, tmp_path):
    teacher, traj = flow_pipeline
    edited = tmp_path / "traj"
    shutil.copytree(traj, edited)
    meta_path = edited / "meta.json"
    meta = json.load(open(meta_path))
    json.dump(dict(meta, time_convention="sit"), open(meta_path, "w"))
    with pytest.raises(ValueError, match="time_convention is 'sit', expected 'repa'"):
        tt.run(tt.ard_argv(teacher, edited, tmp_path / "r", "--iterations", 1, "--teacher-family", "flow"))
    json.dump(dict(meta, time_shift=1.0, time_grid="uniform"), open(meta_path, "w"))  # points of a shifted grid
    with pytest.raises(ValueError, match="boundary_sigmas is .*, expected \\[1.0, 0.75, 0.5, 0.25\\]"):
        tt.run(tt.ard_argv(teacher, edited, tmp_path / "r", "--iterations", 1, "--teacher-family", "flow"))


def test_sample_py_samples_a_flow_teacher_with_its_own_solver(flow_pipeline, tmp_path, capsys):
    teacher, traj = flow_pipeline
    out = tmp_path / "grid.png"
    sample.main(["--ckpt", teacher, "--teacher-family", "flow", "--solver", "heun", "--num-sampling-steps", "8",
                 "--time-shift", "3", "--cfg-scale", "1", "--out", str(out), "--device", "cpu"])
    assert out.exists() and "teacher (8 steps): 10 images" in capsys.readouterr().out
    sample.main(["--ckpt", teacher, "--teacher-family", "flow", "--solver", "dopri5", "--out", str(out),
                 "--device", "cpu"])
    generate, net, _ = sample.load_generator(teacher, flow=dict(teacher_family="flow", time_convention=None,
                                                                solver="euler", last_step=None, time_shift=3.0,
                                                                guidance_interval=(0.0, 1.0)),
                                             steps=8, cfg_scale=1.5, guidance_channels=None)
    shard = load_file(os.path.join(traj, "shard_00000.safetensors"))
    state, labels = shard["state"], shard["labels"]
    torch.testing.assert_close(generate(state[:4, 0].float(), labels[:4]), state[:4, -1].float(), rtol=1e-3,
                               atol=1e-3)


def test_gan_stage_refuses_a_flow_student(flow_pipeline, tmp_path):
    teacher, traj = flow_pipeline
    student = tt.run(tt.ard_argv(teacher, traj, tmp_path / "ard", "--teacher-family", "flow", "--iterations", 1,
                                 "--parametrization", "euler"))
    with pytest.raises(ValueError, match="--stage gan fine-tunes students of DDPM teachers; .* distils a flow teacher"):
        tt.run(tt.gan_argv(tt.ckpt(student, 1), traj, tmp_path / "gan", "--iterations", 1))
