"""extract_trajectories.py and TrajectoryDataset on a tiny random teacher (CPU, offline).

One 1-process extraction (in-process) and one 2-process gloo extraction (torchrun) are made
once per module; the other tests compare against them or work on copies of their output.
"""
import json
import os
import pickle
import re
import shutil
import subprocess
import sys
from collections import namedtuple

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader

import extract_trajectories as et
import models
from diffusion import create_diffusion, student_timesteps
from utils import index_noise_and_labels, index_seed

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# 3 shards (odd, so 2 ranks get unequal work) of 20 samples, solved in batches of 8, 8, 4.
NUM_SAMPLES, SHARD_SIZE, BATCH_SIZE, NUM_SHARDS = 60, 20, 8, 3
K, S, SEED, CFG, LABELS = 4, 10, 7, 1.5, "uniform"
SHAPE = [1, 8, 8]
NUM_CLASSES = 10


def make_teacher(path, seed=0):
    """A tiny teacher checkpoint in our training format, adaLN-Zero layers perturbed off zero."""
    g = torch.Generator().manual_seed(seed)
    m = models.DiT(input_size=8, patch_size=2, in_channels=1, hidden_size=64, depth=2, num_heads=4,
                   num_classes=NUM_CLASSES)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    torch.save({"model": m.state_dict(), "ema": m.state_dict(), "opt": {}, "step": 0,
                "args": {"stage": "teacher", "dit": m.config, "image_size": 8, "vae": "none"}}, path)
    return m.config


def argv(ckpt, out, *extra):
    return ["--ckpt", str(ckpt), "--out", str(out), "--num-samples", str(NUM_SAMPLES),
            "--shard-size", str(SHARD_SIZE), "--batch-size", str(BATCH_SIZE), "--num-steps", str(K),
            "--teacher-steps", str(S), "--cfg-scale", str(CFG), "--seed", str(SEED), "--labels", LABELS,
            *map(str, extra)]


def shard_name(i):
    return f"shard_{i:05d}.safetensors"


def contents(directory):
    """{file name: bytes} of everything in a trajectory directory."""
    return {name: open(os.path.join(directory, name), "rb").read() for name in sorted(os.listdir(directory))}


def expected_files():
    return ["meta.json"] + [shard_name(i) for i in range(NUM_SHARDS)]


class Recorder:
    """Wraps et.atomic_write to record which files a run writes."""

    def __init__(self):
        self.written = []
        self._write = et.atomic_write

    def __call__(self, path, write):
        self.written.append(os.path.basename(path))
        return self._write(path, write)

    def shards(self):
        return sorted(name for name in self.written if name.startswith("shard_"))


class Killed(Exception):
    pass


def must_not_solve(*args, **kwargs):
    raise AssertionError("the run started solving")


# ---------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    path = tmp_path_factory.mktemp("teacher") / "teacher.pt"
    config = make_teacher(path)
    return str(path), config


@pytest.fixture(scope="module")
def single(teacher, tmp_path_factory):
    """A complete 1-process extraction, run in this process."""
    out = tmp_path_factory.mktemp("single") / "traj"
    et.main(argv(teacher[0], out))
    return str(out)


def torchrun_extraction(args):
    """extract_trajectories.py on 2 gloo processes under torchrun: the finished process."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                             "MASTER_PORT")}
    env.update(PYTHONPATH=ROOT + os.pathsep + env.get("PYTHONPATH", ""), CUDA_VISIBLE_DEVICES="")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           os.path.join(ROOT, "extract_trajectories.py"), *args, "--device", "cpu"]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)


@pytest.fixture(scope="module")
def ddp(teacher, tmp_path_factory):
    """The same extraction on 2 gloo processes under torchrun."""
    out = tmp_path_factory.mktemp("ddp") / "traj"
    proc = torchrun_extraction(argv(teacher[0], out))
    assert proc.returncode == 0, f"torchrun failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return str(out)


@pytest.fixture(scope="module")
def teacher_model(teacher):
    model, info = models.load_teacher(teacher[0])
    return model


@pytest.fixture(scope="module")
def reference_solve(single, teacher_model):
    """Shard 1 of the single run next to a DDIM solve of the same samples with DiT's own CFG call."""
    i = 1
    indices = range(i * SHARD_SIZE, (i + 1) * SHARD_SIZE)
    noise, labels = index_noise_and_labels(SEED, indices, SHAPE, NUM_CLASSES, LABELS)
    n = len(indices)
    diffusion = create_diffusion(str(S))
    z = torch.cat([noise, noise])
    kwargs = dict(y=torch.cat([labels, torch.full_like(labels, NUM_CLASSES)]), cfg_scale=CFG)
    with torch.no_grad():
        # a pixel-space teacher: x0-predictions clipped to [-1, 1]
        final = diffusion.ddim_sample_loop(teacher_model.forward_with_cfg, z.shape, z, clip_denoised=True,
                                           model_kwargs=kwargs)[:n]
        steps = [{k: v[:n] for k, v in out.items()} for out in diffusion.ddim_sample_loop_progressive(
            teacher_model.forward_with_cfg, z.shape, z, clip_denoised=True, model_kwargs=kwargs)]
    shard = load_file(os.path.join(single, shard_name(i)))
    return dict(indices=indices, noise=noise, labels=labels, final=final, steps=steps, shard=shard)


def assert_fp16_close(stored, reference):
    """Equal up to the fp16 rounding of storage (and fp32 batch-composition noise)."""
    assert stored.dtype == torch.float16
    torch.testing.assert_close(stored.float(), reference.float(), rtol=1e-3, atol=1e-3)


def assert_clearly_differs(stored, other, margin=0.05):
    """Guards the tolerance above: a wrong point would not pass as a right one."""
    assert (stored.float() - other.float()).abs().max() > margin


# ---------------------------------------------------------------------------- world size, resume

def test_two_processes_write_the_same_bytes_as_one(single, ddp):
    a, b = contents(single), contents(ddp)
    assert sorted(a) == sorted(b) == expected_files()  # nothing else (no .tmp) left behind
    for name in a:
        assert a[name] == b[name], f"{name} differs between 1 and 2 processes"
    assert json.loads(a["meta.json"]) == json.loads(b["meta.json"])


def test_rerun_of_complete_run_writes_nothing(single, teacher, tmp_path, monkeypatch):
    out = tmp_path / "traj"
    shutil.copytree(single, out)
    recorder = Recorder()
    monkeypatch.setattr(et, "atomic_write", recorder)
    monkeypatch.setattr(et, "solve_trajectories", must_not_solve)
    et.main(argv(teacher[0], out))
    assert recorder.shards() == []
    assert contents(out) == contents(single)


def test_resume_after_lost_shards_and_partial_tmp(single, teacher, tmp_path, monkeypatch):
    out = tmp_path / "traj"
    shutil.copytree(single, out)
    kept = os.path.join(out, shard_name(1))
    before = os.stat(kept)
    os.remove(os.path.join(out, shard_name(0)))
    os.remove(os.path.join(out, shard_name(2)))
    with open(os.path.join(out, shard_name(2) + ".tmp"), "wb") as f:  # a write killed half-way
        f.write(open(os.path.join(single, shard_name(2)), "rb").read()[:5000])
    recorder = Recorder()
    monkeypatch.setattr(et, "atomic_write", recorder)
    et.main(argv(teacher[0], out))

    assert recorder.shards() == [shard_name(0), shard_name(2)]
    after = os.stat(kept)
    assert (after.st_ino, after.st_mtime_ns, after.st_size) == (before.st_ino, before.st_mtime_ns, before.st_size)
    assert sorted(os.listdir(out)) == expected_files()  # the .tmp is gone
    assert contents(out) == contents(single)

    ds = et.TrajectoryDataset(str(out))
    assert len(ds) == NUM_SAMPLES
    seeds = torch.cat([load_file(os.path.join(out, shard_name(i)))["seeds"] for i in range(NUM_SHARDS)]).tolist()
    assert seeds == [index_seed(SEED, i) for i in range(NUM_SAMPLES)]
    assert len(set(seeds)) == NUM_SAMPLES
    noise, _ = index_noise_and_labels(SEED, range(NUM_SAMPLES), SHAPE, NUM_CLASSES, LABELS)
    for i in range(NUM_SAMPLES):  # the dataset's item i is sample i: none missing, none twice
        assert torch.equal(ds[i][0][0], noise[i].half().float())


def test_resume_after_a_crash_mid_run(single, teacher, tmp_path, monkeypatch):
    out = tmp_path / "traj"
    calls = []

    def crash_on_second_shard(tensors, path):
        calls.append(path)
        if len(calls) == 2:
            with open(path, "wb") as f:
                f.write(b"partial")
            raise Killed("killed while writing")
        save_file(tensors, path)

    with monkeypatch.context() as m:
        m.setattr(et, "save_file", crash_on_second_shard)
        with pytest.raises(Killed):
            et.main(argv(teacher[0], out))
    assert sorted(os.listdir(out)) == ["meta.json", shard_name(0)]  # no half-written shard under its name
    recorder = Recorder()
    monkeypatch.setattr(et, "atomic_write", recorder)
    et.main(argv(teacher[0], out))
    assert recorder.shards() == [shard_name(1), shard_name(2)]
    assert contents(out) == contents(single)


def test_late_rank_splits_the_same_work_list(single, teacher, tmp_path, monkeypatch):
    """Rank 1 of 2 lists the directory only after rank 0 has finished shard 0: it must still
    take shard 1 (its half of rank 0's list [0, 1, 2]), else shard 1 is never written."""
    out = tmp_path / "traj"
    os.makedirs(out)
    shutil.copy(os.path.join(single, "meta.json"), out)  # rank 0 wrote meta.json before the others go on

    def rank0_races_ahead(rank, work):  # and completes shard 0 before rank 1 goes on
        shutil.copy(os.path.join(single, shard_name(0)), out)

    recorder = Recorder()
    monkeypatch.setattr(et, "init_distributed", lambda *args: (1, 2, torch.device("cpu")))
    monkeypatch.setattr(et, "on_rank_zero", rank0_races_ahead)
    monkeypatch.setattr(et, "atomic_write", recorder)
    et.main(argv(teacher[0], out))
    assert recorder.shards() == [shard_name(1)]


# ---------------------------------------------------------------------------- contents

def test_meta_records_the_run(single, teacher):
    meta = json.load(open(os.path.join(single, "meta.json")))
    steps, times = student_timesteps(K, S)
    assert (meta["boundary_steps"], meta["boundary_times"]) == (steps, times) == ([0, 2, 4, 7], [999, 777, 555, 222])
    expected = dict(format=et.FORMAT_VERSION, teacher_ckpt=teacher[0], dit=teacher[1], image_size=8, vae="none",
                    shape=SHAPE, solver="ddim", eta=0.0, clip_denoised=True, teacher_steps=S, cfg_scale=CFG, guidance_channels=3,
                    num_steps=K, dtype="float16", seed=SEED, noise_stream="trajectories", labels=LABELS,
                    num_classes=NUM_CLASSES, num_samples=NUM_SAMPLES, shard_size=SHARD_SIZE)
    for key, value in expected.items():
        assert meta[key] == value, key
    assert set(meta["points"]) == {"state", "x0", "labels", "seeds"}


def test_shard_layout_and_disk_estimate(single):
    meta = json.load(open(os.path.join(single, "meta.json")))
    for i in range(NUM_SHARDS):
        path = os.path.join(single, shard_name(i))
        shard = load_file(path)
        assert {k: (tuple(v.shape), v.dtype) for k, v in shard.items()} == {
            "state": ((SHARD_SIZE, K + 1, *SHAPE), torch.float16), "x0": ((SHARD_SIZE, K - 1, *SHAPE), torch.float16),
            "labels": ((SHARD_SIZE,), torch.int64), "seeds": ((SHARD_SIZE,), torch.int64)}
        assert torch.isfinite(shard["state"]).all() and torch.isfinite(shard["x0"]).all()
        # the estimate printed (and checked against free space) before the run is the arrays' size
        assert 0 <= os.path.getsize(path) - et.shard_bytes(meta) < 1024


def test_noise_labels_and_seeds(reference_solve):
    r = reference_solve
    shard = r["shard"]
    assert torch.equal(shard["labels"], r["labels"])
    assert len(set(shard["labels"].tolist())) > 1
    assert shard["seeds"].tolist() == [index_seed(SEED, i) for i in r["indices"]]
    assert torch.equal(shard["state"][:, 0], r["noise"].half())


def test_final_point_is_ddim_sample_loop_with_cfg(reference_solve, teacher_model):
    r = reference_solve
    stored = r["shard"]["state"][:, -1]
    assert_fp16_close(stored, r["final"])
    assert_fp16_close(stored, r["steps"][-1]["sample"])
    # guidance matters here, so the match above is a match with CFG
    diffusion = create_diffusion(str(S))
    with torch.no_grad():
        unguided = diffusion.ddim_sample_loop(teacher_model.forward, r["noise"].shape, r["noise"],
                                              clip_denoised=True, model_kwargs=dict(y=r["labels"]))
    assert_clearly_differs(stored, unguided)
    z = torch.cat([r["noise"], r["noise"]])
    kwargs = dict(y=torch.cat([r["labels"], torch.full_like(r["labels"], NUM_CLASSES)]), cfg_scale=CFG)
    with torch.no_grad():  # and the clipping of the x0-predictions matters too
        unclipped = diffusion.ddim_sample_loop(teacher_model.forward_with_cfg, z.shape, z, clip_denoised=False,
                                               model_kwargs=kwargs)[:len(r["noise"])]
    assert_clearly_differs(stored, unclipped)


def test_intermediate_points_are_the_progressive_solve(reference_solve):
    r = reference_solve
    state, x0, steps = r["shard"]["state"], r["shard"]["x0"], r["steps"]
    boundaries = student_timesteps(K, S)[0]
    assert len(steps) == S
    for k, b in enumerate(boundaries[1:]):
        # the state at boundary step b is the sample after step b-1; x0 is step b's prediction
        assert_fp16_close(state[:, k + 1], steps[b - 1]["sample"])
        assert_fp16_close(x0[:, k], steps[b]["pred_xstart"])
        assert_clearly_differs(state[:, k + 1], steps[b]["sample"])
        # neighbours move less when the x0-predictions are clipped: 10x fp16's tolerance apart
        assert_clearly_differs(state[:, k + 1], steps[b - 2]["sample"], margin=0.01)
        assert_clearly_differs(x0[:, k], steps[b - 1]["pred_xstart"], margin=0.01)
        assert_clearly_differs(x0[:, k], steps[b + 1]["pred_xstart"], margin=0.01)


def test_no_cfg_balanced_labels(teacher, teacher_model, tmp_path):
    """--cfg-scale 1 solves with the plain conditional model; balanced labels are index mod classes."""
    out = tmp_path / "traj"
    et.main(["--ckpt", teacher[0], "--out", str(out), "--num-samples", "20", "--shard-size", "10",
             "--batch-size", "10", "--num-steps", "2", "--teacher-steps", "4", "--cfg-scale", "1"])
    meta = json.load(open(out / "meta.json"))
    assert (meta["cfg_scale"], meta["labels"], meta["seed"], meta["num_steps"]) == (1.0, "balanced", 0, 2)
    shard = load_file(out / shard_name(1))
    assert shard["labels"].tolist() == [i % NUM_CLASSES for i in range(10, 20)]
    noise, labels = index_noise_and_labels(0, range(10, 20), SHAPE, NUM_CLASSES, "balanced")
    with torch.no_grad():
        final = create_diffusion("4").ddim_sample_loop(teacher_model.forward, noise.shape, noise,
                                                       clip_denoised=True, model_kwargs=dict(y=labels))
    assert_fp16_close(shard["state"][:, -1], final)


def test_seed_changes_the_noise(single):
    stored = load_file(os.path.join(single, shard_name(0)))
    noise0, labels0 = index_noise_and_labels(0, range(SHARD_SIZE), SHAPE, NUM_CLASSES, LABELS)
    assert not torch.equal(stored["state"][:, 0], noise0.half())
    assert not torch.equal(stored["labels"], labels0)


def test_shards_are_readable_like_meta(single):
    meta_mode = os.stat(os.path.join(single, "meta.json")).st_mode & 0o777
    for i in range(NUM_SHARDS):
        assert os.stat(os.path.join(single, shard_name(i))).st_mode & 0o777 == meta_mode


# ---------------------------------------------------------------------------- dataset

@pytest.mark.parametrize("target", ["state", "x0"])
def test_dataset_items(single, teacher, target):
    steps, times = student_timesteps(K, S)
    ds = et.TrajectoryDataset(single, target, expected=dict(num_steps=K, boundary_times=times, shape=SHAPE,
                                                            dit=teacher[1]))
    assert len(ds) == NUM_SAMPLES
    noise, labels = index_noise_and_labels(SEED, range(NUM_SAMPLES), SHAPE, NUM_CLASSES, LABELS)
    for index in (0, 7, 19, 20, 33, 59):
        shard = load_file(os.path.join(single, shard_name(index // SHARD_SIZE)))
        row = index % SHARD_SIZE
        state, x0 = shard["state"][row].float(), shard["x0"][row].float()
        inputs, targets, label = ds[index]
        assert inputs.shape == targets.shape == (K, *SHAPE)
        assert inputs.dtype == targets.dtype == torch.float32
        assert label.dtype == torch.int64 and label.dim() == 0 and int(label) == int(labels[index])
        assert torch.equal(inputs[1:], targets[:-1])
        assert torch.equal(inputs[0], noise[index].half().float())
        assert torch.equal(targets[-1], state[-1])
        middle = state[1:-1] if target == "state" else x0
        assert torch.equal(inputs[1:], middle)
    other = et.TrajectoryDataset(single, "x0" if target == "state" else "state")
    assert not torch.equal(ds[5][0], other[5][0])  # the two targets really are different points


@pytest.mark.parametrize("target", ["state", "x0"])
def test_dataset_in_dataloader_workers(single, target):
    ds = et.TrajectoryDataset(single, target)
    ds[25]  # opens a shard handle in this process, which pickling must drop
    copy = pickle.loads(pickle.dumps(ds))
    assert all(torch.equal(a, b) for a, b in zip(copy[45], ds[45]))
    loader = DataLoader(ds, batch_size=16, num_workers=2, shuffle=False)
    batches = list(loader)
    inputs = torch.cat([b[0] for b in batches])
    targets = torch.cat([b[1] for b in batches])
    labels = torch.cat([b[2] for b in batches])
    assert inputs.shape == targets.shape == (NUM_SAMPLES, K, *SHAPE) and inputs.dtype == torch.float32
    assert labels.shape == (NUM_SAMPLES,) and labels.dtype == torch.int64
    for i in (0, 21, 59):
        assert torch.equal(inputs[i], ds[i][0]) and torch.equal(targets[i], ds[i][1]) and labels[i] == ds[i][2]


def test_dataset_index_out_of_range(single):
    ds = et.TrajectoryDataset(single)
    for index in (NUM_SAMPLES, NUM_SAMPLES + SHARD_SIZE, -NUM_SAMPLES - 1):
        try:
            ds[index]
        except IndexError:
            continue
        except Exception as e:
            raise AssertionError(f"ds[{index}] raised {type(e).__name__}: {e}") from None
        raise AssertionError(f"ds[{index}] returned an item")


def test_dataset_pickles_for_spawned_workers(single):
    ds = et.TrajectoryDataset(single, "x0")
    ds[3]
    loader = DataLoader(ds, batch_size=30, num_workers=2, multiprocessing_context="spawn")
    inputs, targets, labels = map(torch.cat, zip(*loader))
    assert inputs.shape == (NUM_SAMPLES, K, *SHAPE)
    assert torch.equal(inputs[40], ds[40][0]) and torch.equal(targets[40], ds[40][1]) and labels[40] == ds[40][2]


# ---------------------------------------------------------------------------- bad input

@pytest.fixture
def broken(single, tmp_path):
    out = tmp_path / "traj"
    shutil.copytree(single, out)
    return str(out)


def _rewrite(path, data):
    with open(path, "wb") as f:
        f.write(data)


def _truncate(path):
    _rewrite(path, open(path, "rb").read()[:-10])


def _garbage(path):
    _rewrite(path, torch.randint(0, 256, (os.path.getsize(path),), dtype=torch.uint8).numpy().tobytes())


def _bad_header(path):
    data = open(path, "rb").read()
    _rewrite(path, data[:8] + b"{not json" + data[17:])


def _empty(path):
    _rewrite(path, b"")


def _other_shapes(path):
    save_file({"state": torch.zeros(SHARD_SIZE, K, *SHAPE, dtype=torch.float16)}, path)


@pytest.mark.parametrize("damage", [_truncate, _garbage, _bad_header, _empty, _other_shapes])
@pytest.mark.parametrize("target", ["state", "x0"])
def test_damaged_shard_names_the_file(broken, damage, target):
    path = os.path.join(broken, shard_name(1))
    damage(path)
    with pytest.raises(ValueError, match=re.escape(path)):
        et.TrajectoryDataset(broken, target)


@pytest.mark.parametrize("damage", [_truncate, _empty, _bad_header, _other_shapes])
def test_rerun_redoes_a_damaged_shard(single, broken, teacher, monkeypatch, capsys, damage):
    """A shard cut short (a crash of the machine after its rename) is found by its header and
    size, and written again, saying so; the whole ones are kept."""
    damaged = os.path.join(broken, shard_name(1))
    damage(damaged)
    recorder = Recorder()
    monkeypatch.setattr(et, "atomic_write", recorder)
    et.main(argv(teacher[0], broken))
    assert recorder.shards() == [shard_name(1)]
    assert re.search(rf"{re.escape(damaged)}.*: writing it again", capsys.readouterr().out)
    assert contents(broken) == contents(single)


def test_missing_shard_names_the_file(broken):
    path = os.path.join(broken, shard_name(2))
    os.remove(path)
    with pytest.raises(FileNotFoundError, match=re.escape(path)):
        et.TrajectoryDataset(broken)


def test_held_out_trajectories_come_from_the_evaluation_stream_and_never_train(single, teacher, tmp_path):
    held_out = str(tmp_path / "held_out")
    et.main(argv(teacher[0], held_out, "--held-out"))
    assert json.load(open(os.path.join(held_out, "meta.json")))["noise_stream"] == "evaluation"
    evaluation, _ = index_noise_and_labels(SEED, range(NUM_SAMPLES), SHAPE, NUM_CLASSES, LABELS, stream="evaluation")
    held, trained = (load_file(os.path.join(d, shard_name(0)))["state"][:, 0] for d in (held_out, single))
    assert torch.equal(held, evaluation[:SHARD_SIZE].half())
    assert not (held[:, None] == trained[None]).flatten(2).all(2).any()  # no x_T in common, same seed
    et.TrajectoryDataset(held_out, held_out=True)
    with pytest.raises(ValueError, match="expected trajectories trajectories .* never training"):
        et.TrajectoryDataset(held_out)
    with pytest.raises(ValueError, match="expected evaluation trajectories"):
        et.TrajectoryDataset(single, held_out=True)


def test_missing_meta(tmp_path):
    with pytest.raises(FileNotFoundError, match="meta.json"):
        et.TrajectoryDataset(str(tmp_path))


def test_unknown_target(single):
    with pytest.raises(ValueError, match="target"):
        et.TrajectoryDataset(single, "eps")


@pytest.mark.parametrize("field, value", [
    ("num_steps", 2),
    ("boundary_times", [999, 750, 500, 250]),
    ("shape", [4, 8, 8]),
    ("dit", {**models.DiT(input_size=8, patch_size=2, in_channels=1, hidden_size=64, depth=3, num_heads=4,
                          num_classes=NUM_CLASSES).config}),
])
def test_meta_mismatch_names_the_field(single, teacher, field, value):
    times = student_timesteps(K, S)[1]
    good = dict(num_steps=K, boundary_times=times, shape=SHAPE, dit=teacher[1])
    et.TrajectoryDataset(single, expected=good)  # the right configuration passes
    with pytest.raises(ValueError, match=rf"meta\.json.*\b{field}\b"):
        et.TrajectoryDataset(single, expected={**good, field: value})


@pytest.mark.parametrize("extra, field", [
    (["--cfg-scale", "2.0"], "cfg_scale"),
    (["--num-steps", "2"], "num_steps"),
    (["--seed", "8"], "seed"),
    (["--labels", "balanced"], "labels"),
    (["--teacher-steps", "20"], "teacher_steps"),
])
def test_rerun_with_other_settings_stops_before_solving(broken, teacher, monkeypatch, extra, field):
    os.remove(os.path.join(broken, shard_name(1)))  # work left to do, yet it must not start
    before = contents(broken)
    monkeypatch.setattr(et, "solve_trajectories", must_not_solve)
    with pytest.raises(ValueError, match=rf"\b{field}\b"):
        et.main(argv(teacher[0], broken, *extra))
    assert contents(broken) == before


def test_rank0_failure_stops_every_rank_with_its_message(broken, teacher):
    """Rank 0 finds meta.json of another run. Rank 1 must not wait for it in a barrier (under NCCL
    that is a hang until the timeout): every rank stops at once with rank 0's error."""
    proc = torchrun_extraction(argv(teacher[0], broken, "--seed", 8, "--dist-timeout", 1))
    assert proc.returncode != 0
    message = "meta.json (from an earlier run with other settings): seed is 7, expected 8"
    for rank in (0, 1):
        assert f"[rank{rank}]: ValueError: {os.path.join(broken, message)}" in proc.stderr, proc.stderr[-3000:]


@pytest.mark.parametrize("changed", [False, True])
def test_rerun_with_a_teacher_rewritten_at_its_path(broken, teacher, tmp_path, monkeypatch, changed):
    """meta.json records the teacher's weights, not only its path: other weights under the same
    name stop the run before it solves; the same weights pass."""
    path = str(tmp_path / "rewritten.pt")
    meta = json.load(open(os.path.join(broken, "meta.json")))
    et.save_json(dict(meta, teacher_ckpt=path), os.path.join(broken, "meta.json"))
    monkeypatch.setattr(et, "solve_trajectories", must_not_solve)
    if changed:
        make_teacher(path, seed=1)
        with pytest.raises(ValueError, match=r"\bteacher_weights_sha256\b"):
            et.main(argv(path, broken))
    else:
        shutil.copy(teacher[0], path)
        et.main(argv(path, broken))


def test_not_enough_disk_space_stops_before_writing(teacher, tmp_path, monkeypatch):
    out = tmp_path / "traj"
    meta = et.build_meta(et.parse_args(argv(teacher[0], out)), dict(models.load_teacher(teacher[0])[1]))
    needed = NUM_SHARDS * et.shard_bytes(meta)
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(et.shutil, "disk_usage", lambda path: usage(10 * needed, 10 * needed, needed - 1))
    monkeypatch.setattr(et, "solve_trajectories", must_not_solve)
    with pytest.raises(OSError, match="disk space"):
        et.main(argv(teacher[0], out))
    assert not out.exists() or os.listdir(out) == []


@pytest.mark.parametrize("extra, message", [
    (["--num-samples", "50"], "multiple of --shard-size"),
    (["--cfg-scale", "0.5"], "cfg-scale"),
])
def test_bad_arguments(teacher, tmp_path, capsys, extra, message):
    with pytest.raises(SystemExit) as e:
        et.parse_args(argv(teacher[0], tmp_path / "traj", *extra))
    assert e.value.code == 2
    assert message in capsys.readouterr().err


def boundary_x0_errors(model_fn, guided, diffusion, z, labels, meta):
    """Per boundary, the MSE of the stored x0-prediction against the fp32 x0-prediction of the
    stored state itself (what the student's x0 target should be), and the MSE of that state's ε."""
    states, x0 = et.solve_trajectories(model_fn, diffusion, z, dict(y=labels), meta)
    n, errors = len(states), []
    for j, step in enumerate(meta["boundary_steps"][1:]):
        x = states[:, j + 1]
        t = torch.full((2 * n,), diffusion.num_timesteps - 1 - step)  # a step of the sampling order
        eps = guided(torch.cat([x, x]), diffusion.model_timesteps(t), torch.cat([labels[:n], labels[n:]]))[:n, :4]
        exact = diffusion.predict_xstart_from_eps(x, t[:n], eps)
        errors.append(((x0[:, j] - exact) ** 2).mean().item())
    return errors


def test_stored_x0_is_the_fp32_prediction_of_the_stored_state():
    """In bf16 the teacher's ε rounding reaches the x0-predictions multiplied by sqrt(1/ᾱ - 1) (17 at
    t=749): extraction runs the teacher in fp32 at those boundaries, bf16 elsewhere (bf16 autocast on
    the CPU stands in for CUDA's), so each stored x0 is the fp32 prediction of its stored state."""
    from test_ard import perturbed_dit
    teacher = perturbed_dit(in_channels=4).eval()
    steps, times = student_timesteps(4, 25)
    meta = dict(cfg_scale=1.5, boundary_steps=steps, boundary_times=times, clip_denoised=False)
    diffusion = create_diffusion("25")
    noise, y = index_noise_and_labels(0, range(8), (4, 8, 8), 10)
    guided, z, labels = models.with_guidance(teacher, noise, y, 1.5)
    bf16 = torch.autocast("cpu", dtype=torch.bfloat16)
    with torch.no_grad():
        mixed = boundary_x0_errors(et.fp32_at_boundaries(guided, bf16, meta), guided, diffusion, z, labels, meta)

        def all_bf16(x, t, **kwargs):
            with bf16:
                return guided(x, t, **kwargs).float()
        rounded = boundary_x0_errors(all_bf16, guided, diffusion, z, labels, meta)
    assert max(mixed) < 1e-10, mixed
    assert rounded[0] > 1e-4, rounded  # at t=749, what the fp32 boundaries remove (measured 1.5e-3)


def test_a_log_file_gets_plain_progress_lines(teacher, tmp_path, capsys):
    et.main(argv(teacher[0], tmp_path / "traj"))
    out, err = capsys.readouterr()
    assert "\r" not in out + err and f"extraction: {NUM_SAMPLES}/{NUM_SAMPLES} traj (100%)" in out
