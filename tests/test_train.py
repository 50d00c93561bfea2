"""train.py (stages teacher / ard / gan) and gan.py on tiny models and 8x8 data (CPU, offline).

The expensive artefacts are made once per module: a tiny teacher trained on the digits, two
trajectory sets extracted from it, one in-process ARD run and one GAN run, and one set of
two-process (torchrun, gloo) runs. The other tests compare against them or start from them.
"""
import argparse
import copy
import functools
import glob
import json
import math
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch
import torch.nn as nn
from torch.distributed.checkpoint import FileSystemWriter

import ard
import extract_trajectories as et
import gan
import models
import train
from data import load_digits
from test_sampling import enable_tf32, tf32_allowed

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Depth 2, width 32, 2 heads, patch 2 on 8x8 images (16 tokens), pixel space.
TINY = ["--image-size", "8", "--vae", "none", "--model", "DiT-S/2", "--depth", "2", "--hidden-size", "32",
        "--num-heads", "2"]
QUIET = ["--num-workers", "0", "--sample-every", "1000", "--log-every", "1", "--device", "cpu"]
# 32 trajectories and a global batch of 8: 4 steps per epoch, so 6 steps cross an epoch boundary
# (and a run resumed after step 3 crosses it after resuming).
TRAJ_SAMPLES, BATCH = 32, 8
K = 4
CKPT_KEYS = {"model", "ema", "opt", "step", "args"}
GAN_KEYS = ("disc_heads", "disc_opt", "reg_reference")  # reg_reference: the divergence guard's level
# Half the steps student-fed: with --global-seed 0, steps 1-6 mix both kinds on either side of step 3.
FED_HALF = ["--student-fed", "0.5"]
DDIM = ["--parametrization", "ddim"]  # the student-fed runs also cover ddim heads


# ---------------------------------------------------------------------------- helpers

@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny tensors: one thread is much faster than two, and immune to a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def ckpt(experiment, step):
    return os.path.join(experiment, "checkpoints", f"{step:07d}")


def ckpt_steps(experiment):
    """Steps of the complete checkpoints of an experiment."""
    return [train.checkpoint_step(p) for p in train.checkpoint_paths(experiment)]


def load(path):
    """A checkpoint folder, or a file (weights_only=True: plain containers and tensors only)."""
    return models.read_checkpoint(path)


def log_steps(experiment):
    """[(step, {name: value})] of the step lines of log.txt."""
    rows = []
    with open(os.path.join(experiment, "log.txt")) as f:
        for line in f:
            m = re.search(r"\] step (\d+) (.*)$", line)
            if m:
                rows.append((int(m.group(1)), {k: float(v) for k, v in re.findall(r"(\S+?)=(\S+)", m.group(2))}))
    return rows


def experiments(results):
    return sorted(glob.glob(os.path.join(str(results), "[0-9][0-9][0-9]-*")))


def assert_same(a, b, where="state"):
    """Bit-identical nested state (dicts, lists, tensors, numbers)."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor), where
        assert a.dtype == b.dtype and a.shape == b.shape, \
            f"{where}: {a.dtype}{tuple(a.shape)} vs {b.dtype}{tuple(b.shape)}"
        assert torch.equal(a, b), f"{where} differs (max |diff| {(a.double() - b.double()).abs().max().item():.3g})"
    elif isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), f"{where}: keys {sorted(a)} vs {sorted(b)}"
        for k in a:
            assert_same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} vs {b!r}"


def assert_same_training_state(a, b):
    """model, EMA, optimiser(s) and step of two checkpoints are bit-identical."""
    assert set(a) == set(b)
    for key in sorted(set(a) - {"args"}):
        assert_same(a[key], b[key], key)


def tensors_close(a, b, rtol, atol):
    return all(torch.allclose(a[k], b[k], rtol=rtol, atol=atol) for k in a)


def ard_argv(teacher_ckpt, traj, results, *extra):
    return ["--stage", "ard", "--teacher", teacher_ckpt, "--data-path", traj, "--history-layers", "1",
            "--global-batch-size", str(BATCH), "--results-dir", str(results), *QUIET, *map(str, extra)]


def gan_argv(init, traj, results, *extra):
    return ["--stage", "gan", "--init", init, "--data-path", traj, "--real-data", "digits",
            "--global-batch-size", str(BATCH), "--results-dir", str(results), *QUIET, *map(str, extra)]


def teacher_argv(results, *extra, data="digits"):
    return ["--stage", "teacher", "--data-path", data, *TINY, "--global-batch-size", "16", "--sample-steps", "2",
            "--results-dir", str(results), *QUIET, *map(str, extra)]


def truncate(path):
    """Cuts a file (a checkpoint folder: its largest shard) to half its length, as a crash of the machine can leave a
    file just written."""
    if os.path.isdir(path):
        path = max(glob.glob(os.path.join(path, "*.distcp")), key=os.path.getsize)
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)


def run(argv, seed=0):
    """train.main in this process from a fixed ambient RNG state (see test_init_follows_global_seed)."""
    torch.manual_seed(seed)
    return train.main([str(a) for a in argv])


def torchrun_process(script, args, timeout=300):
    """`script args` on 2 gloo processes under torchrun: the finished process, failed or not."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env.update(PYTHONPATH=ROOT + os.pathsep + env.get("PYTHONPATH", ""), CUDA_VISIBLE_DEVICES="",
               OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", script, *args]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def torchrun(script, args, timeout=300):
    proc = torchrun_process(script, args, timeout)
    assert proc.returncode == 0, f"torchrun failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return proc


# ---------------------------------------------------------------------------- shared artefacts

@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    """A tiny teacher trained from scratch on the digits for 4 steps (checkpoints at 2 and 4)."""
    results = tmp_path_factory.mktemp("teacher")
    experiment = run(teacher_argv(results, "--iterations", 4, "--ckpt-every", 2))
    return experiment


@pytest.fixture(scope="module")
def teacher_ckpt(teacher):
    return ckpt(teacher, 4)


@pytest.fixture(scope="module")
def traj(teacher_ckpt, tmp_path_factory):
    """32 trajectories, K=4, in 2 shards."""
    out = str(tmp_path_factory.mktemp("traj") / "traj")
    et.main(["--ckpt", teacher_ckpt, "--out", out, "--num-samples", str(TRAJ_SAMPLES), "--shard-size", "16",
             "--batch-size", "16", "--teacher-steps", "8"])
    return out


@pytest.fixture(scope="module")
def traj16(teacher_ckpt, tmp_path_factory):
    """16 trajectories (one shard) for the overfitting test."""
    out = str(tmp_path_factory.mktemp("traj16") / "traj")
    et.main(["--ckpt", teacher_ckpt, "--out", out, "--num-samples", "16", "--shard-size", "16",
             "--batch-size", "16", "--teacher-steps", "8"])
    return out


@pytest.fixture(scope="module")
def ard_run(teacher_ckpt, traj, tmp_path_factory):
    """6 uninterrupted ARD steps in one process (checkpoints at 3 and 6)."""
    return run(ard_argv(teacher_ckpt, traj, tmp_path_factory.mktemp("ard"), "--iterations", 6, "--ckpt-every", 3))


@pytest.fixture(scope="module")
def gan_run(ard_run, traj, tmp_path_factory):
    """4 GAN steps from the ARD run's final checkpoint, warm-up 1 step (checkpoints at 2 and 4)."""
    return run(gan_argv(ckpt(ard_run, 6), traj, tmp_path_factory.mktemp("gan"), "--iterations", 4,
                        "--ckpt-every", 2, "--gan-warmup", 1))


DRIVER = """
import functools, json, sys
import torch
import torch.nn as nn
torch.set_num_threads(1)
torch.compile = functools.partial(torch.compile, backend="aot_eager")  # see compile_with_aot_eager
import train, utils
# One gloo process group for all the runs: train.main's own set-up and tear-down would create a
# new group per run, and re-creating gloo groups in one process is flaky. Everything else in
# train.main runs as under `torchrun train.py`.
group = utils.init_distributed(5, "cpu")
train.init_distributed = lambda *args: group
train.cleanup_distributed = lambda: None
for argv in json.load(open(sys.argv[1])):
    torch.manual_seed(0)  # a fresh process's state does not matter, see test_init_follows_global_seed
    train.main(argv)
utils.cleanup_distributed()
"""


@pytest.fixture(scope="module")
def ddp(teacher_ckpt, traj, ard_run, tmp_path_factory):
    """Two-process gloo runs under torchrun: `torchrun train.py` for the teacher stage, and one
    torchrun of a driver that calls train.main (in one process group) for an ARD run of 6 steps,
    3 steps + the same command to 6 (a restart), a resume to 6 of a copy of `ard_run` whose checkpoint 6 is cut
    short, GAN runs (3 steps, 2 steps + the same command to 3, 2 steps compiled), and the ARD runs student-fed
    (--student-fed 0.5)."""
    base = tmp_path_factory.mktemp("ddp")
    broken = base / "broken" / os.path.basename(ard_run)
    shutil.copytree(ard_run, broken)
    truncate(ckpt(broken, 6))
    torchrun(os.path.join(ROOT, "train.py"), teacher_argv(base / "teacher", "--iterations", 2, "--ckpt-every", 1))
    runs = [
        ard_argv(teacher_ckpt, traj, base / "ard6", "--iterations", 6, "--ckpt-every", 3),
        ard_argv(teacher_ckpt, traj, base / "ard3", "--iterations", 3, "--ckpt-every", 3),
        None,  # the resume, filled in below
        gan_argv(ckpt(ard_run, 6), traj, base / "gan", "--iterations", 3, "--ckpt-every", 3, "--gan-warmup", 1),
        gan_argv(ckpt(ard_run, 6), traj, base / "gan2", "--iterations", 2, "--ckpt-every", 2, "--gan-warmup", 1),
        gan_argv(ckpt(ard_run, 6), traj, base / "gan2", "--iterations", 3, "--ckpt-every", 2, "--gan-warmup", 1),
        gan_argv(ckpt(ard_run, 6), traj, base / "gan_compiled", "--iterations", 2, "--ckpt-every", 2,
                 "--gan-warmup", 1, "--compile"),
        ["--resume", str(broken), "--iterations", "6"],
        ard_argv(teacher_ckpt, traj, base / "fed6", *FED_HALF, *DDIM, "--iterations", 6, "--ckpt-every", 6),
        ard_argv(teacher_ckpt, traj, base / "fed3", *FED_HALF, *DDIM, "--iterations", 3, "--ckpt-every", 3),
        ard_argv(teacher_ckpt, traj, base / "fed3", *FED_HALF, *DDIM, "--iterations", 6, "--ckpt-every", 3),
    ]
    runs[2] = ard_argv(teacher_ckpt, traj, base / "ard3", "--iterations", 6, "--ckpt-every", 3)
    (base / "driver.py").write_text(DRIVER)
    (base / "runs.json").write_text(json.dumps([[str(a) for a in r] for r in runs]))
    torchrun(str(base / "driver.py"), [str(base / "runs.json")])
    out = {name: experiments(base / name)
           for name in ("teacher", "ard6", "ard3", "gan", "gan2", "gan_compiled", "broken", "fed6", "fed3")}
    assert all(len(v) == 1 for v in out.values()), out
    return {name: v[0] for name, v in out.items()}


# ---------------------------------------------------------------------------- every stage runs

def check_checkpoint(path, stage, step, extra_keys=()):
    state = load(path)
    assert set(state) == CKPT_KEYS | set(extra_keys)
    assert state["step"] == step
    assert type(state["args"]) is dict and state["args"]["stage"] == stage
    json.dumps(state["args"])  # plain values only
    assert set(state["model"]) == set(state["ema"])
    assert state["opt"]["state"], "optimiser state is empty"
    return state


def test_teacher_stage_one_process(teacher):
    assert os.path.basename(teacher).startswith("000-teacher-")
    assert ckpt_steps(teacher) == [2, 4]
    state = check_checkpoint(ckpt(teacher, 4), "teacher", 4)
    assert state["args"]["dit"]["depth"] == 2 and state["args"]["dit"]["hidden_size"] == 32
    assert os.path.isfile(os.path.join(teacher, "samples", "0000004.png"))
    assert [s for s, _ in log_steps(teacher)] == [1, 2, 3, 4]
    # the teacher actually trained: weights moved from step 2 to step 4
    a, b = load(ckpt(teacher, 2)), load(ckpt(teacher, 4))
    assert any(not torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    # and the checkpoint is usable as a teacher
    net, info = models.load_teacher(ckpt(teacher, 4))
    assert info["dit"] == state["args"]["dit"]


def test_teacher_without_class_dropout_samples_its_grid_unguided(tmp_path):
    """No null class to guide with: the grid is drawn without CFG, and the log says so."""
    experiment = run(teacher_argv(tmp_path, "--iterations", 1, "--class-dropout", 0))
    assert os.path.isfile(os.path.join(experiment, "samples", "0000001.png"))
    with open(os.path.join(experiment, "log.txt")) as f:
        assert "--class-dropout 0" in f.read()


def test_ard_stage_one_process(ard_run, teacher_ckpt):
    assert ckpt_steps(ard_run) == [3, 6]
    state = check_checkpoint(ckpt(ard_run, 6), "ard", 6)
    assert state["args"]["num_steps"] == K and state["args"]["history_layers"] == 1
    assert os.path.isfile(os.path.join(ard_run, "samples", "0000006.png"))
    student, args = ard.load_student(ckpt(ard_run, 6))
    assert isinstance(student, ard.ARD) and args["teacher"] == teacher_ckpt
    rows = log_steps(ard_run)
    assert [s for s, _ in rows] == list(range(1, 7))
    assert all({"loss", "grad_norm", "stage0", "stage3"} <= set(r) for _, r in rows)


def test_gan_stage_one_process(gan_run):
    assert ckpt_steps(gan_run) == [2, 4]
    check_checkpoint(ckpt(gan_run, 4), "gan", 4, extra_keys=GAN_KEYS)


def test_teacher_stage_two_processes(ddp):
    assert ckpt_steps(ddp["teacher"]) == [1, 2]
    check_checkpoint(ckpt(ddp["teacher"], 2), "teacher", 2)
    with open(os.path.join(ddp["teacher"], "log.txt")) as f:
        assert "world size 2" in f.read()


def test_ard_stage_two_processes(ddp):
    assert ckpt_steps(ddp["ard6"]) == [3, 6]
    check_checkpoint(ckpt(ddp["ard6"], 6), "ard", 6)
    with open(os.path.join(ddp["ard6"], "log.txt")) as f:
        assert "world size 2" in f.read()


def test_gan_stage_two_processes(ddp):
    assert ckpt_steps(ddp["gan"]) == [3]
    check_checkpoint(ckpt(ddp["gan"], 3), "gan", 3, extra_keys=GAN_KEYS)
    weights = [r["gan_weight"] for _, r in log_steps(ddp["gan"])]
    assert weights[0] == 0 and all(w > 0 for w in weights[1:]), weights


def test_compiled_gan_stage_two_processes(ddp):
    """torch.compile(DDP(student)) one step past the warm-up computes what DDP(student) does."""
    compiled, eager = load(ckpt(ddp["gan_compiled"], 2)), load(ckpt(ddp["gan2"], 2))
    assert tensors_close(compiled["model"], eager["model"], rtol=1e-4, atol=1e-6)
    assert tensors_close(compiled["disc_heads"], eager["disc_heads"], rtol=1e-4, atol=1e-6)


def test_two_processes_match_one_process(ddp, ard_run):
    """Same global batch, split over 2 ranks: the same training up to float rounding."""
    one, two = load(ckpt(ard_run, 6)), load(ckpt(ddp["ard6"], 6))
    assert tensors_close(one["model"], two["model"], rtol=1e-4, atol=1e-6)
    assert tensors_close(one["ema"], two["ema"], rtol=1e-4, atol=1e-6)
    assert not all(torch.equal(one["model"][k], load(ckpt(ard_run, 3))["model"][k]) for k in one["model"])
    # the logged losses are the global batch's: the mean over ranks of the local means
    for (s1, r1), (s2, r2) in zip(log_steps(ard_run), log_steps(ddp["ard6"])):
        assert s1 == s2 and r1["loss"] == pytest.approx(r2["loss"], rel=1e-4)
        assert r1["stage3"] == pytest.approx(r2["stage3"], rel=1e-4)
        assert r1["grad_norm"] == pytest.approx(r2["grad_norm"], rel=1e-3)


# ---------------------------------------------------------------------------- the ARD loss overfits

def test_ard_loss_falls_tenfold_when_overfitting(teacher_ckpt, traj16, tmp_path):
    """16 trajectories, the whole set in every batch, lr 3e-3: the loss falls > 10x in 100 steps (direct heads,
    which start far from their targets; ddim heads start at the tiny teacher's own jump, 1e-7 away)."""
    steps = 100
    experiment = run(["--stage", "ard", "--teacher", teacher_ckpt, "--data-path", traj16, "--history-layers", "1",
                      "--parametrization", "direct",
                      "--global-batch-size", "16", "--iterations", steps, "--lr", "3e-3", "--ckpt-every", steps,
                      "--results-dir", tmp_path, *QUIET])
    rows = log_steps(experiment)
    assert len(rows) == steps
    first, last = rows[0][1]["loss"], rows[-1][1]["loss"]
    assert last < first / 10, (first, last)

    # the same from the weights: the teacher-initialised student against the trained one, on all 16
    data = et.TrajectoryDataset(traj16)
    stages, targets, y = (torch.stack(t) for t in zip(*[data[i] for i in range(len(data))]))
    state = load(ckpt(experiment, steps))
    args = state["args"]

    def dataset_loss(weights):
        student = ard.ARD(models.DiT(**args["dit"]), **ard.student_kwargs(args))
        student.load_state_dict(weights)
        with torch.no_grad():
            return ard.distillation_loss(student(stages, y), targets)[0].item()

    initial = ard.ARD(models.load_teacher(teacher_ckpt)[0], **ard.student_kwargs(args)).state_dict()
    before, after = dataset_loss(initial), dataset_loss(state["model"])
    assert before == pytest.approx(first, rel=1e-3)  # the log keeps 4 significant digits
    assert after < before / 10, (before, after)


# ---------------------------------------------------------------------------- resume is bit-identical

@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    """12 RGB images (10x12, centre-cropped to 8x8) in 2 class folders: with a global batch of 4
    an epoch is 3 steps, and random flips are on (the default for image folders)."""
    from PIL import Image
    root = tmp_path_factory.mktemp("images")
    g = torch.Generator().manual_seed(0)
    for c in range(2):
        (root / f"class{c}").mkdir()
        for i in range(6):
            pixels = torch.randint(0, 256, (10, 12, 3), generator=g, dtype=torch.uint8).numpy()
            Image.fromarray(pixels).save(root / f"class{c}" / f"{i}.png")
    return str(root)


@pytest.mark.parametrize("stage, workers", [("teacher", 0), ("ard", 0), ("ard", 2), ("ard-fed", 0), ("gan", 0)])
def test_resume_is_bit_identical_one_process(stage, workers, teacher_ckpt, traj, ard_run, image_folder, tmp_path):
    if stage == "teacher":
        argv = lambda results: teacher_argv(results, "--global-batch-size", 4, data=image_folder)  # noqa: E731
    elif stage == "ard":
        argv = lambda results: ard_argv(teacher_ckpt, traj, results)  # noqa: E731
    elif stage == "ard-fed":
        argv = lambda results: ard_argv(teacher_ckpt, traj, results, *FED_HALF, *DDIM,  # noqa: E731
                                        "--student-fed-ema")
    else:
        argv = lambda results: gan_argv(ckpt(ard_run, 6), traj, results, "--gan-warmup", 2)  # noqa: E731
    extra = ["--num-workers", workers]
    whole = run(argv(tmp_path / "whole") + ["--iterations", 6, "--ckpt-every", 6] + extra)
    part = run(argv(tmp_path / "part") + ["--iterations", 3, "--ckpt-every", 3] + extra)
    assert ckpt_steps(part) == [3]
    assert run(["--resume", part, "--iterations", 6]) == part
    assert ckpt_steps(part) == [3, 6]
    a, b = load(ckpt(whole, 6)), load(ckpt(part, 6))
    assert_same_training_state(a, b)
    assert a["step"] == b["step"] == 6
    if stage == "gan":
        assert "disc_heads" in a and "disc_opt" in a
    if stage == "ard-fed":  # EMA-fed and teacher-forced steps both before and after the resume
        assert b["args"]["student_fed"] == 0.5 and b["args"]["student_fed_ema"]
        assert b["args"]["parametrization"] == "ddim"
        fed = [r["fed"] for _, r in log_steps(part)]
        assert set(fed[:3]) == set(fed[3:]) == {0, 1}, fed
    # the resumed run logged steps 4..6 only, after the first run's 1..3
    assert [s for s, _ in log_steps(part)] == [1, 2, 3, 4, 5, 6]
    # and steps 4..6 really changed the weights (the comparison is not vacuous)
    c = load(ckpt(part, 3))
    assert any(not torch.equal(c["model"][k], b["model"][k]) for k in b["model"])


def test_gan_resumes_without_its_init_checkpoint(gan_run, ard_run, traj, tmp_path):
    """The resumed checkpoint holds everything --init gave the run: the init file may be gone."""
    init = tmp_path / "init"
    shutil.copytree(ckpt(ard_run, 6), init)
    part = run(gan_argv(str(init), traj, tmp_path / "results", "--iterations", 2, "--ckpt-every", 2,
                        "--gan-warmup", 1))
    shutil.rmtree(init)
    run(["--resume", part, "--iterations", 4])
    assert_same_training_state(load(ckpt(gan_run, 4)), load(ckpt(part, 4)))


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_training_allows_tf32_under_bf16_only(precision, tmp_path, monkeypatch):
    """--precision fp32 is IEEE fp32 (as sampling: test_sampling.test_fp32_sampling_is_ieee_fp32_not_tf32); under
    bf16, what stays fp32 may round to TF32."""
    enable_tf32(monkeypatch)
    run(teacher_argv(tmp_path, "--iterations", 1, "--precision", precision))
    assert tf32_allowed() == (precision == "bf16",) * 2


def test_gan_starts_from_an_export_as_from_its_ema_with_a_fresh_optimiser(ard_run, traj, tmp_path):
    """--init EXPORT.safetensors: the run equals one from the checkpoint whose model is its EMA and whose AdamW
    has no state yet, and its log says so."""
    exported = str(tmp_path / "student.safetensors")
    train.main(["--export", ckpt(ard_run, 6), exported])
    state = load(ckpt(ard_run, 6))
    state.update(model=state["ema"], opt=dict(state["opt"], state={}))
    torch.save(state, tmp_path / "ema_init.pt")
    runs = [run(gan_argv(init, traj, tmp_path / name, "--iterations", 2, "--ckpt-every", 2, "--gan-warmup", 1))
            for name, init in (("export", exported), ("checkpoint", tmp_path / "ema_init.pt"))]
    assert_same_training_state(load(ckpt(runs[0], 2)), load(ckpt(runs[1], 2)))
    with open(os.path.join(runs[0], "log.txt")) as f:
        assert "is an export: the model and its EMA start from its EMA weights, with a fresh optimiser" in f.read()


def test_resume_is_bit_identical_two_processes(ddp):
    resumed = ddp["ard3"]
    assert ckpt_steps(resumed) == [3, 6]
    assert_same_training_state(load(ckpt(ddp["ard6"], 6)), load(ckpt(resumed, 6)))
    assert_same_training_state(load(ckpt(ddp["ard6"], 3)), load(ckpt(resumed, 3)))
    assert [s for s, _ in log_steps(resumed)] == [1, 2, 3, 4, 5, 6]
    # the GAN stage too (student, EMA, both optimisers, discriminator), resumed after the warm-up
    assert ckpt_steps(ddp["gan2"]) == [2, 3]
    assert_same_training_state(load(ckpt(ddp["gan"], 3)), load(ckpt(ddp["gan2"], 3)))


def test_student_fed_resume_is_bit_identical_two_processes(ddp):
    assert_same_training_state(load(ckpt(ddp["fed6"], 6)), load(ckpt(ddp["fed3"], 6)))
    assert [r["fed"] for _, r in log_steps(ddp["fed6"])] == [r["fed"] for _, r in log_steps(ddp["fed3"])]


def test_student_fed_two_processes_match_one_process(ddp, teacher_ckpt, traj, tmp_path):
    """Every rank makes the same per-step choice and rolls out its own part of the batch."""
    one = run(ard_argv(teacher_ckpt, traj, tmp_path, *FED_HALF, *DDIM, "--iterations", 6, "--ckpt-every", 6))
    a, b = load(ckpt(one, 6)), load(ckpt(ddp["fed6"], 6))
    assert tensors_close(a["model"], b["model"], rtol=1e-4, atol=1e-6)
    assert [r["fed"] for _, r in log_steps(one)] == [r["fed"] for _, r in log_steps(ddp["fed6"])]


def test_resume_falls_back_to_the_newest_checkpoint_that_reads(ddp, ard_run):
    """Two processes resume a run whose newest checkpoint (6) is cut short: from checkpoint 3, saying
    so, to the same weights as the uninterrupted run."""
    with open(os.path.join(ddp["broken"], "log.txt")) as f:
        log = f.read()
    assert f"skipped {ckpt(ddp['broken'], 6)}: it does not read" in log
    assert f"resuming from {ckpt(ddp['broken'], 3)} (step 3)" in log
    resumed, uninterrupted = load(ckpt(ddp["broken"], 6)), load(ckpt(ard_run, 6))
    assert tensors_close(resumed["model"], uninterrupted["model"], rtol=1e-4, atol=1e-6)


def test_resume_continues_a_run_of_single_file_checkpoints(ard_run, tmp_path):
    """A run whose checkpoints are the single .pt files train.py wrote before its checkpoint folders continues from
    them, to the same state as the uninterrupted run."""
    experiment = str(tmp_path / os.path.basename(ard_run))
    shutil.copytree(ard_run, experiment)
    for step in (3, 6):
        shutil.rmtree(ckpt(experiment, step))
    torch.save(load(ckpt(ard_run, 3)), ckpt(experiment, 3) + ".pt")
    run(["--resume", experiment])
    assert ckpt_steps(experiment) == [3, 6]
    assert_same_training_state(load(ckpt(ard_run, 6)), load(ckpt(experiment, 6)))


def test_resume_keeps_the_run_settings(teacher_ckpt, traj, tmp_path, capsys):
    first = run(ard_argv(teacher_ckpt, traj, tmp_path, "--iterations", 2, "--ckpt-every", 2, "--lr", "5e-4",
                         "--max-grad-norm", "0.5", "--ema-decay", "0.9"))
    run(["--resume", first, "--iterations", 4, "--log-every", 2])
    state = load(ckpt(first, 4))
    args = state["args"]
    assert (args["lr"], args["max_grad_norm"], args["ema_decay"]) == (5e-4, 0.5, 0.9)
    assert (args["iterations"], args["log_every"], args["history_layers"]) == (4, 2, 1)
    assert [g["lr"] for g in state["opt"]["param_groups"]] == [5e-4]
    assert [s for s, _ in log_steps(first)] == [1, 2, 4]
    # the parsed arguments of a resume are the checkpoint's, with only run-control flags changed
    args = train.parse_args(["--resume", first, "--iterations", "10"])
    assert (args.stage, args.lr, args.data_path, args.iterations, args.log_every) == ("ard", 5e-4, traj, 10, 2)


@pytest.mark.parametrize("flag, value", [("--lr", "1e-3"), ("--history-layers", "2"), ("--stage", "teacher"),
                                         ("--global-batch-size", "16"), ("--student-fed", "0.5"),
                                         ("--student-fed-ramp", "10")])
def test_resume_with_a_changed_setting_stops(ard_run, flag, value, capsys):
    before = ckpt_steps(ard_run)
    with pytest.raises(SystemExit) as e:
        train.main(["--resume", ard_run, flag, value, "--iterations", "8"])
    assert e.value.code == 2
    assert f"drop {flag}" in capsys.readouterr().err
    assert ckpt_steps(ard_run) == before


def test_resume_with_a_setting_changed_to_its_default_stops(teacher_ckpt, traj, tmp_path):
    first = run(ard_argv(teacher_ckpt, traj, tmp_path, "--iterations", 1, "--ckpt-every", 1, "--lr", "5e-4"))
    with pytest.raises(SystemExit):
        train.parse_args(["--resume", first, "--lr", "1e-4"])  # 1e-4 is the default


def test_the_same_command_continues_its_run(teacher_ckpt, traj, ard_run, tmp_path):
    """A restart (torchrun --max-restarts, a requeued job) re-runs the command: it continues the run in its own
    directory, bit-identical to one uninterrupted run, with more --iterations if they grew; other settings are
    another run."""
    first = run(ard_argv(teacher_ckpt, traj, tmp_path, "--iterations", 3, "--ckpt-every", 3))
    assert run(ard_argv(teacher_ckpt, traj, tmp_path, "--iterations", 6, "--ckpt-every", 3)) == first
    assert ckpt_steps(first) == [3, 6]
    assert_same_training_state(load(ckpt(ard_run, 6)), load(ckpt(first, 6)))
    assert [s for s, _ in log_steps(first)] == [1, 2, 3, 4, 5, 6]  # steps 1-3 not trained again
    assert run(ard_argv(teacher_ckpt, traj, tmp_path, "--iterations", 6, "--ckpt-every", 3)) == first  # done
    assert [s for s, _ in log_steps(first)] == [1, 2, 3, 4, 5, 6]
    other = run(ard_argv(teacher_ckpt, traj, tmp_path, "--iterations", 1, "--ckpt-every", 1, "--lr", "5e-4"))
    assert other != first and ckpt_steps(other) == [1]
    assert os.path.basename(first).startswith("000-ard-N1-") and os.path.basename(other).startswith("001-ard-N1-")


def test_a_run_is_named_by_its_paths_and_settings_not_their_spelling(teacher_ckpt, traj, tmp_path, monkeypatch):
    """./x, /abs/x and a symlink to x are one run; flags that change only memory or the sample grids are
    run control, not settings."""
    link = tmp_path / "trajectories"
    os.symlink(traj, link)
    monkeypatch.chdir(os.path.dirname(traj))
    spellings = [traj, os.path.join(".", os.path.basename(traj)), str(link)]
    settings = [train.run_settings(train.parse_args(ard_argv(teacher_ckpt, path, tmp_path))) for path in spellings]
    assert settings[0] == settings[1] == settings[2] and settings[0]["data_path"] == os.path.realpath(traj)
    memory = train.parse_args(ard_argv(teacher_ckpt, traj, tmp_path, "--grad-checkpointing", "--sample-steps", 5))
    assert train.run_settings(memory) == settings[0]


def test_a_run_without_its_settings_is_continued_only_by_resume(ard_run, traj, tmp_path, capsys):
    """A run from before runs recorded their settings: its command stops, naming --resume."""
    legacy = tmp_path / "000-ard-old"
    shutil.copytree(ard_run, legacy)
    os.remove(legacy / "settings.json")
    with pytest.raises(SystemExit):
        train.parse_args(ard_argv(ckpt(ard_run, 6), traj, tmp_path, "--name", "old"))
    assert f"continue it with --resume {legacy} or choose another --name" in capsys.readouterr().err
    assert train.parse_args(["--resume", str(legacy), "--iterations", "8"]).resume == str(legacy)


def test_a_named_run_refuses_other_settings(teacher_ckpt, traj, tmp_path, capsys):
    first = run(ard_argv(teacher_ckpt, traj, tmp_path, "--name", "mine", "--iterations", 1, "--ckpt-every", 1))
    assert os.path.basename(first) == "000-ard-mine"
    with pytest.raises(SystemExit) as e:
        train.main([str(a) for a in ard_argv(teacher_ckpt, traj, tmp_path, "--name", "mine", "--lr", "5e-4")])
    assert e.value.code == 2
    assert (f"{first} is a run with --lr 0.0001, not 0.0005: re-run its command to continue it, or choose another "
            "--name for a new run") in capsys.readouterr().err
    assert ckpt_steps(first) == [1] and experiments(tmp_path) == [first]


def test_a_run_stopped_before_its_first_checkpoint_starts_again_in_its_directory(teacher_ckpt, traj, tmp_path):
    argv = ard_argv(teacher_ckpt, traj, tmp_path, "--iterations", 1, "--ckpt-every", 1)
    first = run(argv)
    shutil.rmtree(os.path.join(first, "checkpoints"))
    os.remove(os.path.join(first, "settings.json"))  # stopped between making the directory and writing them
    assert run(argv) == first and ckpt_steps(first) == [1]
    with open(os.path.join(first, "settings.json")) as f:
        assert json.load(f)["lr"] == 1e-4


def test_resume_without_checkpoints_stops(tmp_path, capsys):
    (tmp_path / "checkpoints").mkdir()
    with pytest.raises(SystemExit):
        train.main(["--resume", str(tmp_path)])
    assert "no readable checkpoint" in capsys.readouterr().err


@pytest.mark.parametrize("stage", ["teacher", "gan"])
def test_init_follows_global_seed(stage, ard_run, traj, tmp_path):
    """Two runs with the same flags (same --global-seed) from different ambient RNG states."""
    if stage == "teacher":
        argv = lambda results: teacher_argv(results, "--iterations", 1)  # noqa: E731
    else:
        argv = lambda results: gan_argv(ckpt(ard_run, 6), traj, results, "--iterations", 1)  # noqa: E731
    a, b = run(argv(tmp_path / "a"), seed=1), run(argv(tmp_path / "b"), seed=2)
    assert_same_training_state(load(ckpt(a, 1)), load(ckpt(b, 1)))


# ---------------------------------------------------------------------------- adversarial fine-tuning

@pytest.fixture(scope="module")
def digits_student(tmp_path_factory):
    """A regression student (N=0) of the shipped digits teacher: 60 steps of batch 16 on 128 trajectories of its
    25-step solve, and those trajectories."""
    base = tmp_path_factory.mktemp("digits_student")
    teacher = os.path.join(ROOT, "assets", "digits_teacher.safetensors")
    trajectories = str(base / "traj")
    et.main(["--ckpt", teacher, "--out", trajectories, "--num-samples", "128", "--shard-size", "128", "--batch-size",
             "128", "--teacher-steps", "25", "--cfg-scale", "1.5", "--device", "cpu"])
    student = run(["--stage", "ard", "--teacher", teacher, "--data-path", trajectories, "--history-layers", 0,
                   "--lr", "1e-3", "--ema-decay", 0.995, "--global-batch-size", 16, "--iterations", 60,
                   "--results-dir", base, *QUIET, "--log-every", 60])
    return ckpt(student, 60), trajectories


@pytest.mark.slow
@pytest.mark.parametrize("scale", [10, 1])
def test_divergence_guard_stops_the_papers_weight_scale_only(scale, digits_student, tmp_path, capsys):
    """The adversarial stage on the digits (the demo's recipe, a 10-step warm-up): at the paper's weight scale x 10
    the regression loss passes DIVERGENCE_MULTIPLE times its end-of-warm-up level within 30 adversarial steps and
    the run stops with its last good checkpoint; at x 1 it stays at that level and the run is never stopped."""
    init, trajectories = digits_student
    argv = gan_argv(init, trajectories, tmp_path, "--lr", "1e-4", "--ema-decay", 0.995, "--global-batch-size", 16,
                    "--gan-warmup", 10, "--gan-weight-scale", scale, "--iterations", 40, "--log-every", 5,
                    "--ckpt-every", 10)
    if scale == 1:
        experiment = run(argv)
        assert ckpt_steps(experiment) == [10, 20, 30, 40]
        return
    with pytest.raises(RuntimeError) as error:
        run(argv)
    (experiment,) = experiments(tmp_path)
    reg = dict((s, r["reg"]) for s, r in log_steps(experiment))
    assert reg[40] > train.DIVERGENCE_MULTIPLE * reg[10] > reg[35]  # stopped at the first log line past it
    assert str(error.value).startswith(
        f"the adversarial stage diverged: regression loss {reg[40]:.3g} after step 40, more than 20 times its "
        f"{reg[10]:.3g} at the end of the warm-up; stopping with the last good checkpoint {ckpt(experiment, 30)}. "
        "Lower --gan-weight-scale")
    assert ckpt_steps(experiment) == [10, 20, 30]
    run(argv + ["--no-divergence-guard"])  # the same run goes on without the guard
    assert ckpt_steps(experiment) == [10, 20, 30, 40]



def test_gan_updates_discriminator_and_student(gan_run, ard_run, teacher_ckpt):
    init, mid, end = load(ckpt(ard_run, 6)), load(ckpt(gan_run, 2)), load(ckpt(gan_run, 4))
    # the student, its EMA and its optimiser start from the ARD checkpoint and move
    changed = [k for k in init["model"] if not torch.equal(init["model"][k], end["model"][k])]
    assert any(k.startswith("heads.") for k in changed) and any(k.startswith("blocks.") for k in changed)
    assert any(not torch.equal(init["ema"][k], end["ema"][k]) for k in init["ema"])
    assert end["opt"]["state"][0]["step"] == init["opt"]["state"][0]["step"] + 4
    # every discriminator head moves between steps 2 and 4; the frozen features (the teacher) are not saved
    heads = list(end["disc_heads"])
    for i in range(2):
        moved = [k for k in heads
                 if k.startswith(f"{i}.") and not torch.equal(mid["disc_heads"][k], end["disc_heads"][k])]
        assert any("parametrizations" in k for k in moved) and any("cmap" in k for k in moved), moved
    assert not any(k.startswith("features") for k in heads)
    # the discriminator's optimiser holds exactly the heads' parameters (not the spectral-norm vectors)
    assert len(end["disc_opt"]["state"]) == len([k for k in heads if not k.endswith(("_u", "_v"))])


def test_adversarial_steps_lower_the_discriminators_hinge_loss(ard_run, traj, tmp_path, monkeypatch):
    """8 adversarial steps (no warm-up) lower the discriminator's hinge loss on a fixed batch: 8 real digits
    against the --init student's final-stage predictions. --disc-lr 1e-2: the tiny teacher's conditioning
    vector (norm ~0.1) makes the projection's logits start near 0 and grow slowly at the default 1e-3."""
    initial = []

    def recording(teacher, **settings):  # a copy of the discriminator as the run builds it, before it trains
        discriminator = gan.Discriminator(teacher, **settings)
        initial.append(copy.deepcopy(discriminator).eval())
        return discriminator

    monkeypatch.setattr(train, "Discriminator", recording)
    steps = 8
    experiment = run(gan_argv(ckpt(ard_run, 6), traj, tmp_path, "--iterations", steps, "--ckpt-every", steps,
                              "--gan-warmup", 0, "--disc-lr", 1e-2))
    trained = copy.deepcopy(initial[0])
    trained.heads.load_state_dict(load(ckpt(experiment, steps))["disc_heads"])
    real, real_labels = (t[-BATCH:] for t in load_digits())
    stages, _, labels = teacher_batch(traj, 0)
    student, _ = ard.load_student(ckpt(ard_run, 6))
    clean = torch.zeros(BATCH, dtype=torch.long)
    with torch.no_grad():
        fake = student(stages, labels)[:, -1]

    @torch.no_grad()
    def hinge_loss(discriminator):  # eval: the spectral norms' power iteration does not move
        return gan.discriminator_hinge_loss(discriminator(real, clean, real_labels),
                                            discriminator(fake, clean, labels)).item()

    before, after = hinge_loss(initial[0]), hinge_loss(trained)
    assert after < before - 0.02, (before, after)


def test_generator_gradient_reaches_the_student_and_not_the_discriminator(ard_run, traj, tmp_path, monkeypatch):
    """Past the warm-up, the adversarial term's gradient reaches every student parameter that the final stage
    depends on (all but the earlier stages' heads, whose teacher-forced outputs it does not see) and nothing
    of the discriminator: its frozen teacher features stay frozen, and its heads get no gradient from the
    generator's loss (only their own step trains them)."""
    adversarial = []
    monkeypatch.setattr(train, "generator_hinge_loss",
                        lambda logits: adversarial.append(gan.generator_hinge_loss(logits)) or adversarial[-1])
    args = train.parse_args([str(a) for a in gan_argv(ckpt(ard_run, 6), traj, tmp_path, "--gan-warmup", 0)])
    task = train.AdversarialTask(args, torch.device("cpu"))
    task.model.load_state_dict(task.init_checkpoint["model"])
    loss, _ = task.loss(task.model, teacher_batch(traj, 0), step=0)

    student = dict(task.model.named_parameters())
    grads = torch.autograd.grad(adversarial[0], list(student.values()), retain_graph=True, allow_unused=True)
    reached = {name for name, grad in zip(student, grads) if grad is not None and grad.abs().sum() > 0}
    assert reached == {name for name in student if not name.startswith("heads.") or name.startswith(f"heads.{K - 1}.")}
    loss.backward()
    discriminator = task.discriminator
    assert [n for n, p in discriminator.features.named_parameters() if p.requires_grad or p.grad is not None] == []
    assert [n for n, p in discriminator.heads.named_parameters() if not p.requires_grad or p.grad is not None] == []


def test_gan_weight_is_zero_during_warmup_and_positive_after(gan_run, ard_run, traj, tmp_path):
    rows = log_steps(gan_run)
    assert [s for s, _ in rows] == [1, 2, 3, 4]
    weights = [r["gan_weight"] for _, r in rows]
    assert weights[0] == 0 and all(w > 0 for w in weights[1:]), weights
    assert not {"g_adv", "g_reg_grad", "g_adv_grad"} & set(rows[0][1])  # the warm-up computes no adversarial term
    for _, r in rows[1:]:  # the gradient norms on the last head that the adaptive weight is made of
        assert r["gan_weight"] == pytest.approx(10 * min(r["g_reg_grad"] / (r["g_adv_grad"] + 1e-4), 1e4), rel=2e-3)
    for _, r in rows:
        assert {"reg", "d_loss", "d_real", "d_fake", "d_acc", "loss"} <= set(r) and 0 <= r["d_acc"] <= 1
        # hinge: relu(1 - real) + relu(1 + fake) >= 1 - mean real + 1 + mean fake, equal while no logit saturates
        assert r["d_loss"] >= 2 - r["d_real"] + r["d_fake"] - 1e-3
        assert r["loss"] == pytest.approx(r["reg"] + r["gan_weight"] * r.get("g_adv", 0), rel=1e-3, abs=1e-3)

    warm = run(gan_argv(ckpt(ard_run, 6), traj, tmp_path / "warm", "--iterations", 3, "--ckpt-every", 3,
                        "--gan-warmup", 1000))
    rows = log_steps(warm)
    assert len(rows) == 3 and all(r["gan_weight"] == 0 and r["loss"] == r["reg"] for _, r in rows)
    cold = run(gan_argv(ckpt(ard_run, 6), traj, tmp_path / "cold", "--iterations", 1, "--ckpt-every", 1,
                        "--gan-warmup", 0))
    assert log_steps(cold)[0][1]["gan_weight"] > 0


def test_log_line_across_the_warmup_end_averages_each_value_over_its_steps(gan_run, ard_run, traj, tmp_path):
    """Steps 1 (warm-up) and 2 in one log line: g_adv is step 2's, the loss the mean of both."""
    experiment = run(gan_argv(ckpt(ard_run, 6), traj, tmp_path, "--iterations", 2, "--ckpt-every", 2,
                              "--gan-warmup", 1, "--log-every", 2))
    [(step, logged)] = log_steps(experiment)
    first, second = (r for _, r in log_steps(gan_run)[:2])
    assert step == 2 and logged["g_adv"] == pytest.approx(second["g_adv"], rel=1e-3)
    # the log prints 4 significant digits, and the two losses may nearly cancel: compare to their rounding
    rounding = 1e-3 * max(abs(first["loss"]), abs(second["loss"]), abs(logged["loss"]))
    assert logged["loss"] == pytest.approx((first["loss"] + second["loss"]) / 2, abs=rounding)


def test_warmup_runs_the_frozen_teacher_only_for_the_discriminator(ard_run, traj, tmp_path, monkeypatch):
    """The adversarial term has weight 0 in the warm-up: no forward (nor backward) through the
    discriminator for the generator, whose input is the student's output (it requires grad)."""
    calls = []
    forward = gan.Discriminator.forward
    monkeypatch.setattr(gan.Discriminator, "forward", lambda self, x, t, y: (calls.append(x.requires_grad),
                                                                             forward(self, x, t, y))[1])
    run(gan_argv(ckpt(ard_run, 6), traj, tmp_path, "--iterations", 3, "--ckpt-every", 3, "--gan-warmup", 2))
    generator, discriminator_real, discriminator_fake = True, False, False
    assert calls == [discriminator_real, discriminator_fake] * 2 + [generator, discriminator_real, discriminator_fake]


def compile_with_aot_eager(monkeypatch):
    """torch.compile through AOTAutograd without Inductor's C++ build: the donated buffers of a
    compiled backward are AOTAutograd's, shared by every backend, and the test stays fast."""
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="aot_eager"))


def test_compiled_gan_runs_past_the_warmup(gan_run, ard_run, traj, tmp_path, monkeypatch):
    """Step 1 (warm-up) compiles the student's backward; step 2 backpropagates through it three
    times (the adaptive weight's two gradients, then the loss) and computes what eager does."""
    compile_with_aot_eager(monkeypatch)
    experiment = run(gan_argv(ckpt(ard_run, 6), traj, tmp_path, "--iterations", 2, "--ckpt-every", 2,
                              "--gan-warmup", 1, "--compile"))
    assert log_steps(experiment)[1][1]["gan_weight"] > 0
    compiled, eager = load(ckpt(experiment, 2)), load(ckpt(gan_run, 2))
    assert tensors_close(compiled["model"], eager["model"], rtol=1e-4, atol=1e-6)


def test_compiled_student_fed_rollouts(teacher_ckpt, traj, tmp_path, monkeypatch):
    """With --compile the student-fed rollouts run through torch.compile too (online and EMA weights),
    computing what the eager run does."""
    compiled_calls = []

    def recording_compile(fn, **kwargs):
        compiled = torch.compile.__wrapped__(fn, backend="aot_eager")
        if getattr(fn, "__name__", "") != "sample":
            return compiled
        return lambda *a, **k: (compiled_calls.append(fn.__self__), compiled(*a, **k))[1]

    recording_compile.__wrapped__ = torch.compile
    monkeypatch.setattr(torch, "compile", recording_compile)
    for rollout in ([], ["--student-fed-ema"]):
        compiled_calls.clear()
        argv = ard_argv(teacher_ckpt, traj, tmp_path / f"fed{len(rollout)}", "--student-fed", 1, *rollout,
                        "--iterations", 2, "--ckpt-every", 2)
        compiled = run(argv + ["--compile"])
        # two fed steps (the EMA's compiled sample also draws the final grid)
        assert len(compiled_calls) == 2 + len(rollout) and all(m.training != bool(rollout) for m in compiled_calls)
        eager = run(argv)
        assert tensors_close(load(ckpt(compiled, 2))["model"], load(ckpt(eager, 2))["model"], rtol=1e-4, atol=1e-6)


def test_flex_attention_without_compile_stops(teacher_ckpt, traj, tmp_path, capsys):
    expect_usage_error(ard_argv(teacher_ckpt, traj, tmp_path, "--attention", "flex"), capsys,
                       "--attention flex needs --compile (eager FlexAttention materialises every score)")
    assert experiments(tmp_path) == []


def test_gan_noise_option_runs(ard_run, traj, tmp_path):
    experiment = run(gan_argv(ckpt(ard_run, 6), traj, tmp_path, "--iterations", 1, "--ckpt-every", 1,
                              "--gan-noise", "uniform", "--gan-warmup", 0))
    assert load(ckpt(experiment, 1))["args"]["gan_noise"] == "uniform"
    assert math.isfinite(log_steps(experiment)[0][1]["d_loss"])


def test_adaptive_weight_by_hand():
    torch.manual_seed(0)
    w = torch.randn(3, 4, requires_grad=True)
    x = torch.randn(5, 4)
    reg = (x @ w.t()).pow(2).mean()
    adv = -(x @ w.t()).sin().mean()
    g_reg = torch.autograd.grad(reg, w, retain_graph=True)[0]
    g_adv = torch.autograd.grad(adv, w, retain_graph=True)[0]
    expected = g_reg.norm() / (g_adv.norm() + 1e-4) * 10
    weight, reg_norm, adv_norm = gan.adaptive_weight(reg, adv, w)
    assert not (weight.requires_grad or reg_norm.requires_grad or adv_norm.requires_grad)
    assert weight.item() == pytest.approx(expected.item(), rel=1e-6)
    assert (reg_norm, adv_norm) == (g_reg.norm(), g_adv.norm())
    assert gan.adaptive_weight(reg, adv, w, scale=3.0)[0].item() == pytest.approx(expected.item() * 0.3, rel=1e-6)
    # the graph is kept for the backward of reg + weight * adv
    (reg + weight * adv).backward()
    assert torch.allclose(w.grad, g_reg + weight * g_adv)

    # clamped to [0, max_weight] before the scale: an adversarial loss without gradient
    w.grad = None
    reg = (x @ w.t()).pow(2).mean()
    flat = (w * 0).sum()
    assert gan.adaptive_weight(reg, flat, w)[0].item() == pytest.approx(1e4 * 10)
    assert gan.adaptive_weight(reg, flat, w, max_weight=7.0, scale=2.0)[0].item() == pytest.approx(14.0)
    adv = -(x @ w.t()).sin().mean()
    assert gan.adaptive_weight((w * 0).sum(), adv, w)[0].item() == 0


def test_hinge_losses():
    real = torch.tensor([[2.0, 0.5], [-1.0, 1.0]])
    fake = torch.tensor([[-2.0, 0.0], [0.5, -0.5]])
    # relu(1 - real): 0, 0.5, 2, 0 -> 0.625; relu(1 + fake): 0, 1, 1.5, 0.5 -> 0.75
    assert gan.discriminator_hinge_loss(real, fake).item() == pytest.approx(0.625 + 0.75)
    assert gan.generator_hinge_loss(fake).item() == pytest.approx(0.5)  # -mean(-2, 0, 0.5, -0.5)
    # a confident discriminator has zero loss
    assert gan.discriminator_hinge_loss(torch.full((3,), 1.5), torch.full((3,), -1.5)).item() == 0


@pytest.mark.parametrize("batch, group", [(16, 8), (8, 8), (24, 8), (4, 4), (12, 6)])
def test_virtual_batch_norm_normalises_each_virtual_batch(batch, group):
    torch.manual_seed(0)
    norm = gan.VirtualBatchNorm(3, virtual_batch=8)
    with torch.no_grad():
        norm.weight.copy_(torch.tensor([1.0, 2.0, 0.5]))
        norm.bias.copy_(torch.tensor([0.0, 1.0, -1.0]))
    x = torch.randn(batch, 3, 5) * 3 + torch.arange(batch).view(-1, 1, 1)  # groups differ in mean
    out = norm(x)
    for start in range(0, batch, group):
        g, o = x[start:start + group], out[start:start + group]
        mean = g.mean(dim=(0, 2), keepdim=True)
        var = g.var(dim=(0, 2), unbiased=False, keepdim=True)
        expected = (g - mean) / torch.sqrt(var + 1e-5) * norm.weight[:, None] + norm.bias[:, None]
        assert torch.allclose(o, expected, atol=1e-5)
    # statistics come from the batch in eval mode too (no running averages)
    assert torch.equal(norm.eval()(x), out)
    # a sample's output depends only on its own virtual batch
    if batch > group:
        y = x.clone()
        y[-1] += 100
        assert torch.equal(norm(y)[:group], out[:group])


def test_discriminator_shapes_and_frozen_features():
    teacher = models.DiT(input_size=8, patch_size=2, in_channels=1, hidden_size=32, depth=2, num_heads=2,
                         num_classes=10)
    disc = gan.Discriminator(teacher)
    x, t, y = torch.randn(8, 1, 8, 8, requires_grad=True), torch.zeros(8, dtype=torch.long), torch.arange(8)
    logits = disc(x, t, y)
    assert logits.shape == (2, 8, 16)  # (blocks, B, tokens)
    gan.generator_hinge_loss(logits).backward()
    assert x.grad is not None and x.grad.abs().sum() > 0  # gradients flow through the frozen features
    assert all(p.grad is None for p in disc.features.parameters())
    assert all(p.grad is not None for p in disc.heads.parameters())
    assert not disc.train().features.training


def test_discriminator_on_the_lower_or_upper_blocks_is_the_whole_ones_heads_there():
    """--disc-blocks lower/upper: the heads of the blocks read, with the same weights, give the whole
    discriminator's logits of those blocks; a teacher too shallow to split is refused."""
    teacher = models.DiT(input_size=8, patch_size=2, in_channels=1, hidden_size=32, depth=4, num_heads=2,
                         num_classes=10)
    whole = gan.Discriminator(teacher).eval()
    x, t, y = torch.randn(8, 1, 8, 8), torch.full((8,), 3, dtype=torch.long), torch.arange(8)
    with torch.no_grad():
        logits = whole(x, t, y)
        for blocks, read in (("lower", slice(0, 2)), ("upper", slice(2, 4))):
            part = gan.Discriminator(teacher, blocks=blocks).eval()
            part.heads.load_state_dict(nn.ModuleList(whole.heads[read]).state_dict())
            torch.testing.assert_close(part(x, t, y), logits[read], rtol=0, atol=0)
    shallow = models.DiT(input_size=8, patch_size=2, in_channels=1, hidden_size=32, depth=1, num_heads=2,
                         num_classes=10)
    with pytest.raises(ValueError, match="--disc-blocks lower reads no block of a 1-block teacher"):
        gan.Discriminator(shallow, blocks="lower")


# ---------------------------------------------------------------------------- student-fed inputs

def record_forward_calls(monkeypatch):
    """[(stages, y, weights)] of every ARD.forward call, the weights as they were at the call."""
    calls = []
    real_forward = ard.ARD.forward

    def recording(self, stages, y):
        weights = {k: v.detach().clone() for k, v in self.state_dict().items()}
        calls.append((stages.detach().clone(), y.clone(), weights))
        return real_forward(self, stages, y)

    monkeypatch.setattr(ard.ARD, "forward", recording)
    return calls


def teacher_batch(traj, step):
    """(stages, targets, labels) from the trajectories at `step` of a one-process run with --global-seed 0."""
    data = et.TrajectoryDataset(traj)
    indices = next(iter(train.StepBatches(len(data), BATCH, rank=0, world_size=1, seed=0, start_step=step)))
    return [torch.stack(t) for t in zip(*[data[i] for i in indices])]


def ema_of(weights, decay):
    """The EMA weights at each of a run's steps, from the online weights at each step."""
    ema = {k: v.clone() for k, v in weights[0].items()}
    for w in weights:
        for k, v in ema.items():
            if v.is_floating_point():
                torch._foreach_lerp_([v], [w[k]], 1 - decay)
        yield {k: v.clone() for k, v in ema.items()}


@pytest.mark.parametrize("stage, probability, ema", [("ard", 0, False), ("ard", 1, False), ("gan", 1, False),
                                                     ("ard", 1, True)])
def test_stage_inputs_are_the_teachers_or_the_students_own_rollout(stage, probability, ema, teacher_ckpt, traj,
                                                                   ard_run, tmp_path, monkeypatch):
    """--student-fed 0: the teacher's points, exactly. --student-fed 1: x_T, then the rollout
    (KV-cached sample) of the student's weights at that very step, online or (--student-fed-ema)
    EMA; targets stay the teacher's."""
    calls = record_forward_calls(monkeypatch)
    argv = (ard_argv(teacher_ckpt, traj, tmp_path) if stage == "ard" else
            gan_argv(ckpt(ard_run, 6), traj, tmp_path, "--gan-warmup", 1))
    experiment = run(argv + ["--iterations", 3, "--ckpt-every", 3, "--student-fed", probability,
                             *(["--student-fed-ema", "--ema-decay", 0.5, "--ema-rampup", 0] if ema else [])])
    args = load(ckpt(experiment, 3))["args"]
    assert len(calls) == 3 and args["student_fed"] == probability and args["student_fed_ema"] == ema
    online = [weights for _, _, weights in calls]
    rollout_weights = list(ema_of(online, 0.5)) if ema else online
    for step, (stages, y, _) in enumerate(calls):
        teacher_stages, targets, labels = teacher_batch(traj, step)
        assert torch.equal(y, labels) and torch.equal(stages[:, 0], teacher_stages[:, 0])
        if probability == 0:
            assert torch.equal(stages, teacher_stages)
            continue
        student = ard.ARD(models.DiT(**args["dit"]), **ard.student_kwargs(args))
        student.load_state_dict(rollout_weights[step])
        rollout = student.sample(stages[:, 0], y)
        assert torch.equal(stages[:, 1:], rollout[:, :-1]), f"step {step}"
        assert not torch.equal(stages[:, 1:], teacher_stages[:, 1:])
        if ema:
            continue
        logged = log_steps(experiment)[step][1]
        loss = ard.distillation_loss(rollout, targets)[0].item()  # fed its rollout, forward reproduces it
        assert logged["reg" if stage == "gan" else "loss"] == pytest.approx(loss, rel=1e-3)
    assert not torch.equal(calls[0][2]["blocks.0.attn.qkv.weight"], calls[2][2]["blocks.0.attn.qkv.weight"])
    assert [r["fed"] for _, r in log_steps(experiment)] == [probability] * 3


def test_student_fed_choice_is_a_function_of_seed_and_step():
    steps = range(4000)
    choices = [train.feeds_student(0, s, 0.3) for s in steps]
    torch.manual_seed(123)  # neither the global RNG nor anything else enters
    assert [train.feeds_student(0, s, 0.3) for s in steps] == choices
    assert sum(choices) / len(choices) == pytest.approx(0.3, abs=0.03)
    assert [train.feeds_student(1, s, 0.3) for s in steps] != choices
    assert not any(train.feeds_student(0, s, 0.0) for s in steps)
    assert all(train.feeds_student(0, s, 1.0) for s in steps)
    # one draw per step: the steps fed at 0.3 are among those fed at 0.6
    assert all(train.feeds_student(0, s, 0.6) for s in steps if choices[s])


def test_student_fed_ramp():
    probability = train.student_fed_probability
    assert [probability(s, 0.5, ramp=100) for s in (0, 25, 50, 100, 1000)] == pytest.approx([0, 0.125, 0.25, 0.5, 0.5])
    assert probability(0, 0.5, ramp=0) == 0.5
    # over a ramp of 2000 steps, a quarter of the steps at P=0.5
    fed = sum(train.feeds_student(7, s, 0.5, ramp=2000) for s in range(2000))
    assert fed / 2000 == pytest.approx(0.25, abs=0.03)
    assert not any(train.feeds_student(7, s, 0.5, ramp=2000) for s in range(20))


@pytest.mark.parametrize("extra, message", [
    (["--student-fed", "1.5"], "--student-fed must be in [0, 1], got 1.5"),
    (["--student-fed", "-0.1"], "--student-fed must be in [0, 1], got -0.1"),
    (["--student-fed", "nan"], "--student-fed must be in [0, 1], got nan"),
    (["--student-fed", "0.5", "--student-fed-ramp", "-1"], "--student-fed-ramp must be >= 0, got -1"),
    (["--student-fed-ramp", "100"], "--student-fed-ramp needs --student-fed > 0"),
    (["--student-fed-ema"], "--student-fed-ema needs --student-fed > 0"),
    (["--student-fed", "0.5", "--num-steps", "1"], "--student-fed needs --num-steps >= 2"),
])
def test_bad_student_fed_flags(extra, message, teacher_ckpt, traj, tmp_path, capsys):
    expect_usage_error(ard_argv(teacher_ckpt, traj, tmp_path, *extra), capsys, message)
    assert experiments(tmp_path) == []


def test_student_fed_gan_of_a_one_step_student_stops(traj, tmp_path, capsys):
    init = str(tmp_path / "one_step.pt")
    torch.save({"args": {"stage": "ard", "num_steps": 1}}, init)
    expect_usage_error(gan_argv(init, traj, tmp_path, "--student-fed", 0.5), capsys,
                       "--student-fed needs --num-steps >= 2 (one step has no input after x_T); got 1")
    assert experiments(tmp_path) == []


def test_student_fed_teacher_stage_stops(tmp_path, capsys):
    expect_usage_error(teacher_argv(tmp_path, "--student-fed", 0.5), capsys,
                       "--student-fed applies to --stage ard and gan")
    assert experiments(tmp_path) == []



# ---------------------------------------------------------------------------- crashes and NaNs

def failing_finish(exception):
    """A FileSystemWriter.finish (the metadata write that ends a checkpoint's write, on rank 0) that raises
    `exception` in the write of checkpoint 4 (after every rank's shards), and does its work otherwise."""
    real_finish = FileSystemWriter.finish

    def finish(self, *args, **kwargs):
        if str(self.path).endswith("0000004" + train.PARTIAL):
            raise exception
        return real_finish(self, *args, **kwargs)
    return finish


def check_unfinished_write_is_skipped(experiment, log_before):
    """After a run whose checkpoint 4 never finished: only 0000004.partial is there, checkpoint 2 loads, and a
    resume notes the unfinished one and continues from 2, ending like the uninterrupted run."""
    partial = ckpt(experiment, 4) + train.PARTIAL
    assert sorted(os.listdir(os.path.join(experiment, "checkpoints"))) == ["0000002", "0000004" + train.PARTIAL]
    assert ckpt_steps(experiment) == [2] and load(ckpt(experiment, 2))["step"] == 2
    with pytest.raises(Exception):
        load(partial)
    assert run(["--resume", experiment]) == experiment
    with open(os.path.join(experiment, "log.txt")) as f:
        log = f.read()[log_before:]
    assert f"skipped {partial}: its write did not finish" in log
    assert f"resuming from {ckpt(experiment, 2)} (step 2)" in log
    assert sorted(os.listdir(os.path.join(experiment, "checkpoints"))) == ["0000002", "0000004", "0000006"]


def test_failed_checkpoint_write_stops_the_run_and_resume_skips_it(ard_run, teacher_ckpt, traj, tmp_path,
                                                                   monkeypatch):
    """The background write of checkpoint 4 fails before it is complete: the run stops with its error at the next
    checkpoint, the folder keeps its .partial name, and --resume continues from checkpoint 2, bit-identically."""
    monkeypatch.setattr(FileSystemWriter, "finish", failing_finish(OSError(28, "No space left on device")))
    with pytest.raises(Exception, match="No space left on device"):
        run(ard_argv(teacher_ckpt, traj, tmp_path, "--iterations", 6, "--ckpt-every", 2))
    monkeypatch.undo()
    (experiment,) = experiments(tmp_path)
    check_unfinished_write_is_skipped(experiment, os.path.getsize(os.path.join(experiment, "log.txt")))
    assert_same_training_state(load(ckpt(ard_run, 6)), load(ckpt(experiment, 6)))


KILLED_RUN = """
import os, sys
import torch
import torch.nn as nn
torch.set_num_threads(1)
from torch.distributed.checkpoint import FileSystemWriter
import train
real_finish = FileSystemWriter.finish


def killed_finish(self, *args, **kwargs):  # every rank's shards of checkpoint 4 on disk, then killed
    if str(self.path).endswith("0000004" + train.PARTIAL):
        os._exit(9)
    return real_finish(self, *args, **kwargs)


FileSystemWriter.finish = killed_finish
torch.manual_seed(0)
train.main(sys.argv[1:])
"""


def test_kill_while_writing_a_checkpoint_keeps_the_previous_one(ard_run, teacher_ckpt, traj, tmp_path):
    """A run (its own process) is killed with os._exit (no clean-up) while it writes checkpoint 4, its shards on
    disk but not its metadata: the folder keeps its .partial name, checkpoint 2 loads, and --resume notes the
    leftover and continues exactly like an uninterrupted run."""
    script = tmp_path / "killed_run.py"
    script.write_text(KILLED_RUN)
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), CUDA_VISIBLE_DEVICES="",
               OMP_NUM_THREADS="1")
    argv = [str(a) for a in ard_argv(teacher_ckpt, traj, tmp_path / "results", "--iterations", 6, "--ckpt-every", 2)]
    proc = subprocess.run([sys.executable, str(script), *argv], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 9, proc.stderr[-3000:]
    (experiment,) = experiments(tmp_path / "results")
    assert glob.glob(os.path.join(ckpt(experiment, 4) + train.PARTIAL, "*.distcp")), "no shard was written"
    check_unfinished_write_is_skipped(experiment, os.path.getsize(os.path.join(experiment, "log.txt")))
    assert_same_training_state(load(ckpt(ard_run, 6)), load(ckpt(experiment, 6)))


def test_kill_of_a_rank_while_writing_a_checkpoint_under_torchrun(ddp, teacher_ckpt, traj, tmp_path):
    """Two processes under torchrun, rank 0 killed while the ranks write checkpoint 4: a resume by two processes
    skips it and ends bit-identical to the uninterrupted two-process run."""
    script = tmp_path / "killed_run.py"
    script.write_text(KILLED_RUN)
    argv = ard_argv(teacher_ckpt, traj, tmp_path / "results", "--iterations", 6, "--ckpt-every", 2)
    assert torchrun_process(str(script), argv).returncode != 0
    (experiment,) = experiments(tmp_path / "results")
    assert len(glob.glob(os.path.join(ckpt(experiment, 4) + train.PARTIAL, "*.distcp"))) == 2, "a shard per rank"
    log_before = os.path.getsize(os.path.join(experiment, "log.txt"))
    torchrun(os.path.join(ROOT, "train.py"), ["--resume", experiment])
    with open(os.path.join(experiment, "log.txt")) as f:
        log = f.read()[log_before:]
    assert f"skipped {ckpt(experiment, 4)}{train.PARTIAL}: its write did not finish" in log
    assert f"resuming from {ckpt(experiment, 2)} (step 2)" in log
    assert_same_training_state(load(ckpt(ddp["ard6"], 6)), load(ckpt(experiment, 6)))


def test_keep_last_bounds_the_checkpoints_and_keeps_the_newest_complete_one(teacher_ckpt, traj, tmp_path,
                                                                           monkeypatch, capsys):
    """--keep-last K deletes older checkpoints once a newer one is complete, never for a write that failed; it may
    change on a resume. A negative K is refused."""
    experiment = run(ard_argv(teacher_ckpt, traj, tmp_path, "--iterations", 3, "--ckpt-every", 1, "--keep-last", 2))
    assert ckpt_steps(experiment) == [2, 3]
    monkeypatch.setattr(FileSystemWriter, "finish", failing_finish(OSError(28, "No space left on device")))
    with pytest.raises(OSError, match="0000004 was not written"):
        run(["--resume", experiment, "--iterations", 6, "--keep-last", 1])
    assert sorted(os.listdir(os.path.join(experiment, "checkpoints"))) == ["0000002", "0000003",
                                                                          "0000004" + train.PARTIAL]
    monkeypatch.undo()
    run(["--resume", experiment, "--iterations", 6, "--keep-last", 1])
    assert sorted(os.listdir(os.path.join(experiment, "checkpoints"))) == ["0000006"]
    os.makedirs(os.path.join(experiment, "checkpoints", "0000009"))  # a later one a crash left unreadable
    os.makedirs(os.path.join(experiment, "checkpoints", "0000008" + train.PARTIAL))  # and an unfinished write
    run(["--resume", experiment, "--iterations", 7, "--keep-last", 1])  # resumes from 6, not 9
    assert sorted(os.listdir(os.path.join(experiment, "checkpoints"))) == ["0000007", "0000009"]
    expect_usage_error(ard_argv(teacher_ckpt, traj, tmp_path, "--keep-last", -1), capsys,
                       "--keep-last must be >= 0 (0 keeps every checkpoint), got -1")


FULL_DISK_RUN = """
import sys
import torch
import torch.distributed as dist
import torch.nn as nn
torch.set_num_threads(1)
from torch.distributed.checkpoint import FileSystemWriter
import train


def full_disk(self, *args, **kwargs):  # rank 0's shards do not fit
    if dist.get_rank() == 0:
        raise OSError(28, "No space left on device", str(self.path))
    return real_write(self, *args, **kwargs)


real_write = FileSystemWriter.write_data
FileSystemWriter.write_data = full_disk
train.main(sys.argv[1:])
"""


def test_a_rank_failing_to_write_a_checkpoint_stops_every_rank(teacher_ckpt, traj, tmp_path):
    """Rank 1 must not wait for a rank 0 whose share of a checkpoint failed (under NCCL: a hang until the
    timeout): both stop with rank 0's error."""
    script = tmp_path / "full_disk_run.py"
    script.write_text(FULL_DISK_RUN)
    proc = torchrun_process(str(script), ard_argv(teacher_ckpt, traj, tmp_path / "results", "--iterations", 1,
                                                  "--ckpt-every", 1, "--dist-timeout", 1))
    assert proc.returncode != 0
    for rank in (0, 1):
        assert re.search(rf"\[rank{rank}\]:.*No space left on device", proc.stderr), proc.stderr[-3000:]


def poison_loss(monkeypatch, from_call, value=float("nan")):
    """train.distillation_loss returns `value` from its `from_call`-th call (1-based) on."""
    calls = []
    real = train.distillation_loss

    def poisoned(prediction, target):
        calls.append(1)
        loss, per_stage = real(prediction, target)
        return (loss * value if len(calls) >= from_call else loss), per_stage

    monkeypatch.setattr(train, "distillation_loss", poisoned)


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_nan_loss_stops_with_the_last_good_checkpoint(teacher_ckpt, traj, tmp_path, monkeypatch, value):
    poison_loss(monkeypatch, from_call=3, value=value)
    with pytest.raises(FloatingPointError) as e:
        run(ard_argv(teacher_ckpt, traj, tmp_path, "--iterations", 6, "--ckpt-every", 2))
    (experiment,) = experiments(tmp_path)
    assert os.path.join(experiment, "checkpoints") in str(e.value)
    assert "step 3" in str(e.value)
    assert ckpt_steps(experiment) == [2]
    assert sorted(os.listdir(os.path.join(experiment, "checkpoints"))) == ["0000002"]
    assert [s for s, _ in log_steps(experiment)] == [1, 2]
    # the last good checkpoint is intact and finite
    state = load(ckpt(experiment, 2))
    assert all(torch.isfinite(v).all() for v in state["model"].values())


def test_nan_between_log_steps_is_caught_before_the_next_checkpoint(teacher_ckpt, traj, tmp_path, monkeypatch):
    """Logging every 1000 steps: a NaN at step 3 is still caught before checkpoint 4 is written."""
    poison_loss(monkeypatch, from_call=3)
    with pytest.raises(FloatingPointError, match="last good checkpoint"):
        run(ard_argv(teacher_ckpt, traj, tmp_path, "--iterations", 6, "--ckpt-every", 2, "--log-every", 1000))
    (experiment,) = experiments(tmp_path)
    assert sorted(os.listdir(os.path.join(experiment, "checkpoints"))) == ["0000002"]


def test_diverging_learning_rate_stops_the_run(teacher, tmp_path):
    with pytest.raises(FloatingPointError, match="last good checkpoint"):
        run(teacher_argv(tmp_path, "--iterations", 5, "--ckpt-every", 1, "--lr", "1e30"))
    (experiment,) = experiments(tmp_path)
    good = ckpt_steps(experiment)
    assert good and good == list(range(1, len(good) + 1)) and len(good) < 5
    for step in good:
        assert all(torch.isfinite(v).all() for v in load(ckpt(experiment, step))["model"].values())


# ---------------------------------------------------------------------------- bad input

def assert_nothing_ran(results):
    """No experiment got as far as a training step or a checkpoint."""
    for experiment in experiments(results):
        assert ckpt_steps(experiment) == []
        assert not os.path.exists(os.path.join(experiment, "log.txt")) or log_steps(experiment) == []


def expect_usage_error(argv, capsys, message):
    with pytest.raises(SystemExit) as e:
        train.main([str(a) for a in argv])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert message in err, err


def test_trajectories_of_another_student_config(teacher_ckpt, traj, tmp_path):
    with pytest.raises(ValueError, match=r"num_steps is 4, expected 2"):
        run(ard_argv(teacher_ckpt, traj, tmp_path, "--num-steps", 2, "--iterations", 2))
    assert experiments(tmp_path) == []


def tiny_teacher_checkpoint(path, claimed=None, **config):
    """A teacher checkpoint in our format; `claimed` overrides the architecture it records."""
    net = models.DiT(**{**dict(input_size=8, patch_size=2, in_channels=1, hidden_size=32, depth=2, num_heads=2,
                               num_classes=10), **config})
    torch.save({"model": net.state_dict(), "ema": net.state_dict(), "opt": {}, "step": 0,
                "args": {"stage": "teacher", "dit": {**net.config, **(claimed or {})}, "image_size": 8,
                         "vae": "none"}}, path)
    return str(path)


@pytest.mark.parametrize("config, message", [(dict(depth=3), "depth"), (dict(hidden_size=64), "hidden_size")])
def test_teacher_of_another_config(traj, tmp_path, config, message):
    other = tiny_teacher_checkpoint(tmp_path / "other.pt", **config)
    with pytest.raises(ValueError, match=rf"meta.json: dit\.{message} is"):
        run(ard_argv(other, traj, tmp_path / "results", "--iterations", 2))
    assert experiments(tmp_path / "results") == []


def test_teacher_other_than_the_trajectories_one(teacher_ckpt, traj, tmp_path):
    """Same architecture, other weights: the student would start from a teacher that did not
    make its trajectories."""
    other = tiny_teacher_checkpoint(tmp_path / "other.pt", **load(teacher_ckpt)["args"]["dit"])
    with pytest.raises(ValueError, match=r"meta\.json: teacher_weights_sha256 is"):
        run(ard_argv(other, traj, tmp_path / "results", "--iterations", 2))
    assert experiments(tmp_path / "results") == []


def test_gan_init_with_other_stage_times_than_the_trajectories(ard_run, traj, tmp_path):
    init = load(ckpt(ard_run, 6))
    times = init["args"]["stage_times"]
    init["args"]["stage_times"] = [999, 700, 400, 100]
    torch.save(init, tmp_path / "init.pt")
    with pytest.raises(ValueError, match=rf"meta\.json: boundary_times is {re.escape(str(times))}, "
                                         r"expected \[999, 700, 400, 100\]"):
        run(gan_argv(str(tmp_path / "init.pt"), traj, tmp_path / "results", "--iterations", 1))
    assert experiments(tmp_path / "results") == []


def test_teacher_weights_not_matching_its_config(traj, tmp_path):
    bad = tiny_teacher_checkpoint(tmp_path / "bad.pt", claimed=dict(hidden_size=32), hidden_size=64)
    with pytest.raises(ValueError, match="shape mismatch") as e:
        run(ard_argv(bad, traj, tmp_path / "results", "--iterations", 2))
    assert "bad.pt" in str(e.value)
    assert experiments(tmp_path / "results") == []


def test_missing_teacher(traj, tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        run(ard_argv(str(tmp_path / "nope.pt"), traj, tmp_path, "--iterations", 2))
    assert experiments(tmp_path) == []


def test_batch_not_divisible_by_world_size(teacher_ckpt, traj, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    expect_usage_error(ard_argv(teacher_ckpt, traj, tmp_path, "--global-batch-size", 3), capsys,
                       "--global-batch-size 3 is not divisible by the world size 2")
    assert experiments(tmp_path) == []


def test_batch_larger_than_the_data(teacher_ckpt, traj, tmp_path):
    with pytest.raises(ValueError, match="fewer than the global batch 64"):
        run(ard_argv(teacher_ckpt, traj, tmp_path, "--global-batch-size", 64, "--iterations", 2))
    assert_nothing_ran(tmp_path)


@pytest.mark.parametrize("stage", ["teacher", "ard", "gan"])
def test_missing_data_path(stage, teacher_ckpt, ard_run, tmp_path, capsys):
    missing = str(tmp_path / "missing")
    argv = {"teacher": teacher_argv(tmp_path, data=missing), "ard": ard_argv(teacher_ckpt, missing, tmp_path),
            "gan": gan_argv(ckpt(ard_run, 6), missing, tmp_path)}[stage]
    expect_usage_error(argv, capsys, f"--data-path {missing} does not exist")
    assert experiments(tmp_path) == []


def test_no_data_path(capsys, tmp_path):
    expect_usage_error(["--stage", "teacher", "--results-dir", tmp_path], capsys, "--data-path is required")


@pytest.mark.parametrize("drop, message", [("--init", "--stage gan needs --init"),
                                           ("--real-data", "--stage gan needs --real-data")])
def test_gan_needs_init_and_real_data(drop, message, ard_run, traj, tmp_path, capsys):
    argv = gan_argv(ckpt(ard_run, 6), traj, tmp_path)
    i = argv.index(drop)
    expect_usage_error(argv[:i] + argv[i + 2:], capsys, message)
    assert experiments(tmp_path) == []


def test_gan_with_missing_inputs(ard_run, traj, tmp_path, capsys):
    expect_usage_error(gan_argv(str(tmp_path / "none.pt"), traj, tmp_path), capsys, "does not exist")
    argv = gan_argv(ckpt(ard_run, 6), traj, tmp_path)
    argv[argv.index("--real-data") + 1] = str(tmp_path / "no-images")
    expect_usage_error(argv, capsys, "--real-data")
    assert experiments(tmp_path) == []


def class_folders(root, count):
    """An image folder of `count` classes, one 8x8 RGB image each."""
    from PIL import Image
    for c in range(count):
        (root / f"class{c:02d}").mkdir(parents=True)
        Image.new("RGB", (8, 8)).save(root / f"class{c:02d}" / "0.png")
    return str(root)


@pytest.mark.parametrize("real, message", [
    ("shapes", "16x16 images, the student's are 8x8; 3-channel images, the student's have 1"),
    ("folder", "3-channel images, the student's have 1; 11 classes, the student's 10"),
], ids=["shapes", "folder"])
def test_gan_with_real_data_that_does_not_fit_the_student(real, message, ard_run, traj, tmp_path, capsys):
    """The digits student (8x8, 1 channel, 10 classes) against shapes (16x16 RGB) or 11 classes of RGB
    images: one usage error naming every mismatch, before the teacher or the trajectories load."""
    real = class_folders(tmp_path / "images", 11) if real == "folder" else real
    argv = gan_argv(ckpt(ard_run, 6), traj, tmp_path)
    argv[argv.index("--real-data") + 1] = real
    expect_usage_error(argv, capsys, f"--real-data {real} does not fit the student of --init {ckpt(ard_run, 6)}: "
                                     + message)
    assert experiments(tmp_path) == []


@pytest.mark.parametrize("flag, value", [("--history-layers", "2"), ("--teacher", "other.pt"), ("--vae", "mse")])
def test_gan_takes_the_student_and_teacher_settings_from_init(flag, value, ard_run, traj, tmp_path, capsys):
    expect_usage_error(gan_argv(ckpt(ard_run, 6), traj, tmp_path, flag, value), capsys, f"drop {flag}")
    assert experiments(tmp_path) == []


def test_gan_from_a_teacher_checkpoint(teacher_ckpt, traj, tmp_path, capsys):
    expect_usage_error(gan_argv(teacher_ckpt, traj, tmp_path, "--iterations", 1), capsys,
                       f"--init {teacher_ckpt} is not an ARD checkpoint (a teacher checkpoint)")
    assert experiments(tmp_path) == []


def test_gan_from_repas_training_dict_is_refused_in_one_line(teacher_ckpt, traj, tmp_path, capsys):
    """REPA's own training file holds its args as an argparse.Namespace: refused like any other non-student."""
    path = tmp_path / "last.pt"
    state = {**models.read_checkpoint(teacher_ckpt)["ema"], "projectors.0.weight": torch.zeros(1)}
    repa = {"model": state, "ema": state, "opt": {}, "args": argparse.Namespace(model="SiT-XL/2"), "steps": 1}
    torch.save(repa, path)
    expect_usage_error(gan_argv(str(path), traj, tmp_path, "--iterations", 1), capsys,
                       f"--init {path} is not an ARD checkpoint (a REPA checkpoint)")


# ---------------------------------------------------------------------------- EMA and held-out noise

def test_ema_rampup():
    """EDM's ramp-up: the half-life at most R x the steps so far, the set decay from then on; R=0 is constant."""
    half_life = math.log(0.5) / math.log(0.999)  # 692.8 steps
    assert train.ema_decay(0.999, 10, 0) == 0.999
    assert train.ema_decay(0.999, 1, 0.05) == pytest.approx(0.5 ** 20)  # the first update copies the weights
    assert train.ema_decay(0.999, 100, 0.05) == pytest.approx(0.5 ** (1 / 5))
    assert train.ema_decay(0.999, math.ceil(half_life / 0.05), 0.05) == pytest.approx(0.999)
    assert train.ema_decay(0.999, 10 ** 6, 0.05) == pytest.approx(0.999)
    decays = [train.ema_decay(0.999, s, 0.05) for s in range(1, 20000, 50)]
    assert decays == sorted(decays)


def test_ema_follows_the_rampup(teacher_ckpt, traj, tmp_path):
    """After 3 steps at R=0.05 the EMA is nearly the online weights; at R=0 (decay 0.9999) nearly the
    initial ones, so there its gap to the online weights is the whole way the weights moved."""
    ema_gaps = {}
    for rampup in (0.05, 0):
        state = load(ckpt(run(ard_argv(teacher_ckpt, traj, tmp_path / str(rampup), "--iterations", 3,
                                       "--ckpt-every", 3, "--ema-rampup", rampup)), 3))
        ema_gaps[rampup] = sum((state["ema"][k] - state["model"][k]).norm().item() for k in state["model"])
    assert ema_gaps[0.05] < 0.05 * ema_gaps[0]


def test_training_on_held_out_trajectories_stops(teacher_ckpt, tmp_path):
    held_out = str(tmp_path / "held_out")
    et.main(["--ckpt", teacher_ckpt, "--out", held_out, "--num-samples", "16", "--shard-size", "16",
             "--batch-size", "16", "--teacher-steps", "8", "--held-out"])
    with pytest.raises(ValueError, match="held-out trajectories .* never training"):
        train.main(ard_argv(teacher_ckpt, held_out, tmp_path / "results", "--iterations", 1))


# ---------------------------------------------------------------------------- DDP buffers

@pytest.fixture
def one_process_group(tmp_path):
    """A gloo process group of this process alone, so that train.distributed wraps in DDP."""
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_ddp_broadcasts_only_buffers_that_change(one_process_group):
    """The students' and teachers' buffers (positions, stage times and mask, time frequencies) stay as
    they were through a training step, so DDP does not re-send them before every forward; the
    discriminator's spectral-norm vectors change with each forward and are still sent."""
    from test_ard import inputs, perturbed_dit
    from tiny_pixart import tiny_transformer
    cpu = torch.device("cpu")
    student = ard.ARD(perturbed_dit(), num_steps=K, history_layers=2).train()
    before = {k: v.clone() for k, v in student.named_buffers()}
    wrapped = train.distributed(student, cpu)
    wrapped(*inputs()).square().mean().backward()
    assert not wrapped.broadcast_buffers
    assert all(torch.equal(v, before[k]) for k, v in student.named_buffers())
    text_student = train.pixart.PixArtARD(tiny_transformer(), K, history_layers=1)
    assert not train.distributed(text_student, cpu).broadcast_buffers
    assert not train.distributed(perturbed_dit(), cpu).broadcast_buffers
    discriminator = gan.Discriminator(perturbed_dit()).train()
    u = discriminator.heads[0].out.parametrizations.weight[0]._u.clone()
    wrapped = train.distributed(discriminator, cpu)
    wrapped(torch.randn(2, 2, 8, 8), torch.tensor([3, 500]), torch.tensor([1, 2]))
    assert wrapped.broadcast_buffers and not torch.equal(discriminator.heads[0].out.parametrizations.weight[0]._u, u)


def test_a_log_file_gets_log_lines_and_no_progress_redraws(tmp_path, capsys):
    run(teacher_argv(tmp_path, "--iterations", 2, "--ckpt-every", 2))
    out, err = capsys.readouterr()
    assert "\r" not in out + err and re.search(r"step 0000002 .*steps/s=", out)


def tensorboard_scalars(experiment):
    """{tag: [(step, value)]} of a run's TensorBoard event files."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(os.path.join(experiment, "tensorboard")).Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def test_tensorboard_gets_every_logged_scalar_the_lr_and_the_throughput(tmp_path):
    """--tensorboard: each log line's values at its step, plus lr, steps/s and samples/s (steps/s x the global
    batch of 16); a restart that begins again at step 2 replaces what the first run wrote after it."""
    argv = teacher_argv(tmp_path, "--iterations", 3, "--ckpt-every", 2, "--lr", "3e-4", "--tensorboard")
    experiment = run(argv)
    shutil.rmtree(ckpt(experiment, 3))
    assert run(argv) == experiment  # resumed from step 2
    scalars = tensorboard_scalars(experiment)
    logged = dict(log_steps(experiment))  # step 3: the restart's line
    assert set(scalars) == set(logged[1]) - {"steps/s"} | {"lr", "steps_per_s", "samples_per_s"}
    assert [s for s, _ in scalars["loss"]] == [1, 2, 3]
    for step, values in logged.items():
        for name, value in values.items():  # log.txt: 4 digits, steps/s 2 decimals
            tag = "steps_per_s" if name == "steps/s" else name
            assert dict(scalars[tag])[step] == pytest.approx(value, rel=1e-3, abs=0.005 * (tag == "steps_per_s"))
        assert dict(scalars["lr"])[step] == pytest.approx(3e-4)
        assert dict(scalars["samples_per_s"])[step] == pytest.approx(16 * dict(scalars["steps_per_s"])[step])


def test_wandb_without_its_package_stops_before_training(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(train.importlib.util, "find_spec", lambda name: None)  # as if not installed
    expect_usage_error(teacher_argv(tmp_path, "--wandb"), capsys,
                       "--wandb needs the wandb package (pip install wandb); WANDB_MODE=offline logs without a network")
    assert experiments(tmp_path) == []


def test_wandb_gets_every_scalar_in_a_run_named_by_its_directory(tmp_path, monkeypatch):
    """--wandb through a stand-in for the package (not installed here): one W&B run per run directory (its id, so
    that a restart continues it), with the scalars TensorBoard gets."""
    calls = []

    class Run:
        def log(self, scalars, step):
            calls.append(("log", step, dict(scalars)))

        def finish(self):
            calls.append(("finish",))

    def init(**kwargs):
        calls.append(("init", kwargs))
        return Run()
    monkeypatch.setitem(sys.modules, "wandb", type(sys)("wandb"))
    sys.modules["wandb"].init = init
    monkeypatch.setattr(train.importlib.util, "find_spec", lambda name: object())
    experiment = run(teacher_argv(tmp_path, "--iterations", 2, "--ckpt-every", 2, "--wandb", "digits"))
    (_, kwargs), *logs, finish = calls
    with open(os.path.join(experiment, "wandb.json")) as f:
        name, run_id = os.path.basename(experiment), json.load(f)["id"]
    assert (kwargs["project"], kwargs["id"], kwargs["name"], kwargs["resume"]) == ("digits", run_id, name, "allow")
    assert len(run_id) == 16 and run_id != name
    assert kwargs["dir"] == experiment and kwargs["config"]["stage"] == "teacher" and finish == ("finish",)
    assert [step for _, step, _ in logs] == [1, 2]
    for (_, step, scalars), (logged_step, values) in zip(logs, log_steps(experiment)):
        assert step == logged_step and scalars["loss"] == pytest.approx(values["loss"], rel=1e-3)
        assert {"lr", "steps_per_s", "samples_per_s", "grad_norm"} <= set(scalars)
    calls.clear()
    assert run(teacher_argv(tmp_path, "--iterations", 3, "--ckpt-every", 3, "--wandb", "digits")) == experiment
    assert calls[0][1]["id"] == run_id  # a restart continues its W&B run
    shutil.rmtree(experiment)
    calls.clear()
    assert run(teacher_argv(tmp_path, "--iterations", 1, "--wandb", "digits")) == experiment
    assert calls[0][1]["id"] != run_id  # a new run of the same name is a new W&B run


def test_each_stage_has_its_own_defaults(ard_run, traj, tmp_path):
    """--stage gan does not inherit the distillation's 300,000 steps at batch 64."""
    ard_args = train.parse_args(["--stage", "ard", "--data-path", traj])
    gan_args = train.parse_args(["--stage", "gan", "--init", ckpt(ard_run, 6), "--data-path", traj,
                                 "--real-data", "digits"])
    teacher_args = train.parse_args(["--stage", "teacher", "--data-path", "digits"])
    assert (ard_args.iterations, ard_args.global_batch_size) == (300_000, 64)
    assert (gan_args.iterations, gan_args.global_batch_size) == (20_000, 48)
    assert (teacher_args.iterations, teacher_args.global_batch_size) == (400_000, 64)
    assert train.parse_args(["--stage", "gan", "--init", ckpt(ard_run, 6), "--data-path", traj, "--real-data",
                             "digits", "--iterations", "7"]).iterations == 7


def test_stage_heads_default_to_the_teachers_own_solver_step(traj):
    """The study's choice: ddim heads for DDPM teachers (euler for flow teachers); direct on request."""
    assert train.parse_args(["--stage", "ard", "--data-path", traj]).parametrization == "ddim"
    assert train.parse_args(["--stage", "ard", "--data-path", traj, "--teacher-family", "flow"]).parametrization == \
        "euler"
    assert train.parse_args(["--stage", "ard", "--data-path", traj, "--parametrization", "direct"]).parametrization \
        == "direct"
