import contextlib
import errno
import json
import os
import re
import shutil
import subprocess
import sys
import tracemalloc

import numpy as np
import pytest
import torch
from PIL import Image

import sample
import sample_ddp
import train
import utils
from ard import ARD, load_student
from evaluations.npz import NpzImages
from models import DiT, read_checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_teacher():
    torch.manual_seed(0)
    model = DiT(input_size=8, patch_size=2, in_channels=1, hidden_size=32, depth=2, num_heads=2, num_classes=10)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """A teacher and a student checkpoint in train.py's format."""
    root = tmp_path_factory.mktemp("ckpts")
    teacher = tiny_teacher()
    common = dict(dit=teacher.config, image_size=8, vae="none")
    teacher_path, student_path = str(root / "teacher.pt"), str(root / "student.pt")
    torch.save({"model": teacher.state_dict(), "ema": teacher.state_dict(), "opt": {}, "step": 0,
                "args": dict(common, stage="teacher")}, teacher_path)
    student = ARD(teacher, num_steps=4, history_layers=1)
    torch.save({"model": student.state_dict(), "ema": student.state_dict(), "opt": {}, "step": 0,
                "args": dict(common, stage="ard", **student.settings)}, student_path)
    return teacher_path, student_path


def test_sample_writes_the_requested_grid_for_teacher_and_student(checkpoints, tmp_path):
    for ckpt in checkpoints:
        out = tmp_path / "grid.png"
        sample.main(["--ckpt", ckpt, "--sampler", "ddim", "--num-sampling-steps", "5", "--class-labels", "1", "2", "3",
                     "--out", str(out)])
        # a row of three 8x8 images with 2-pixel padding, enlarged 8x
        assert Image.open(out).size == ((3 * (8 + 2) + 2) * 8, (8 + 2 + 2) * 8)


def test_sample_rejects_bad_labels_and_guidance(checkpoints, tmp_path):
    with pytest.raises(SystemExit):
        sample.main(["--ckpt", checkpoints[0], "--class-labels", "10", "--out", str(tmp_path / "x.png")])
    with pytest.raises(SystemExit):
        sample.main(["--ckpt", checkpoints[0], "--cfg-scale", "0.5", "--out", str(tmp_path / "x.png")])


def test_student_generator_returns_the_last_stage(checkpoints):
    generate, student, info = sample.load_generator(checkpoints[1])
    noise, y = torch.randn(2, 1, 8, 8), torch.tensor([3, 4])
    assert info["kind"] == "student" and info["num_steps"] == 4
    torch.testing.assert_close(generate(noise, y), load_student(checkpoints[1])[0].sample(noise, y)[:, -1])


def test_teacher_generator_with_guidance_one_is_the_plain_solve(checkpoints):
    """A pixel-space teacher clips its x0-predictions to [-1, 1] (as ADM does); unclipped differs."""
    generate, teacher, info = sample.load_generator(checkpoints[0], sampler="ddim", steps=5, cfg_scale=1.0)
    assert info["vae"] == "none"
    noise, y = 3 * torch.randn(2, 1, 8, 8), torch.tensor([3, 4])
    from diffusion import create_diffusion
    clipped, unclipped = (create_diffusion("5").ddim_sample_loop(teacher, noise.shape, noise, clip_denoised=clip,
                                                                 model_kwargs=dict(y=y)) for clip in (True, False))
    torch.testing.assert_close(generate(noise, y), clipped)
    assert not torch.allclose(clipped, unclipped)


def ddp_args(ckpt, out, *extra):
    return ["--ckpt", ckpt, "--num-fid-samples", "30", "--chunk-size", "8", "--per-proc-batch-size", "3",
            "--sampler", "ddim", "--num-sampling-steps", "4", "--out", str(out), *extra]


@pytest.fixture(scope="module")
def reference_path(checkpoints, tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp") / "one.npz"
    sample_ddp.main(ddp_args(checkpoints[1], out))
    return out


@pytest.fixture(scope="module")
def reference_npz(reference_path):
    with np.load(reference_path, allow_pickle=False) as f:
        return dict(f)


def test_sample_and_sample_ddp_read_a_sharded_checkpoint(reference_npz, checkpoints, tmp_path):
    """The student checkpoint rewritten as train.py writes checkpoints now (a torch.distributed.checkpoint folder)
    gives the same images to sample.py and sample_ddp.py, and its identity changes with its shards."""
    sharded = str(tmp_path / "0000001")
    train.save_checkpoint(sharded, read_checkpoint(checkpoints[1])).result()
    out = tmp_path / "sharded.npz"
    sample_ddp.main(ddp_args(sharded, out))
    np.testing.assert_array_equal(np.load(out)["arr_0"], reference_npz["arr_0"])
    noise, y = torch.randn(2, 1, 8, 8), torch.tensor([3, 4])
    assert torch.equal(sample.load_generator(sharded)[0](noise, y), sample.load_generator(checkpoints[1])[0](noise, y))
    before = sample_ddp.checkpoint_identity(sharded)
    assert before["bytes"] == sum(os.path.getsize(os.path.join(sharded, f)) for f in os.listdir(sharded))
    train.save_checkpoint(sharded, dict(read_checkpoint(sharded), step=2)).result()
    assert sample_ddp.checkpoint_identity(sharded) != before


def test_sample_ddp_writes_adm_npz(reference_npz, reference_path, checkpoints):
    images, labels = reference_npz["arr_0"], reference_npz["arr_1"]
    assert images.shape == (30, 8, 8, 3) and images.dtype == np.uint8
    assert labels.shape == (30,) and labels.max() < 10
    noise, expected_labels = utils.index_noise_and_labels(0, range(30), (1, 8, 8), 10, "uniform", "evaluation")
    np.testing.assert_array_equal(labels, expected_labels.numpy())
    student = load_student(checkpoints[1])[0]
    expected = utils.to_uint8(student.sample(noise[:3], expected_labels[:3])[:, -1].clamp(-1, 1))
    np.testing.assert_array_equal(images[:3], expected)
    np.testing.assert_array_equal(np.concatenate(list(NpzImages(str(reference_path)).batches(7))), images)


def test_sample_ddp_records_its_settings_in_the_npz(reference_npz, checkpoints):
    """What makes two sample sets pairable, read without pickle: a 0-d string holding the settings' JSON."""
    recorded = reference_npz["settings"]
    assert recorded.shape == () and recorded.dtype.kind == "U"
    settings = json.loads(recorded.item())
    assert settings == json.loads(json.dumps(sample_ddp.parts_settings(sample_ddp.parse_args(
        ddp_args(checkpoints[1], "any.npz")))))
    assert (settings["global_seed"], settings["labels"], settings["noise_stream"]) == (0, "uniform", "evaluation")
    assert settings["num_fid_samples"] == 30 and settings["ckpt"]["path"] == os.path.abspath(checkpoints[1])


def open_files_under(folder):
    """The files under `folder` that this process holds open (Linux's /proc/self/fd)."""
    found = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:  # the listing's own descriptor, closed by now
            continue
        if target.startswith(str(folder)):
            found.append(target)
    return found


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc/self/fd")
def test_sample_ddp_closes_every_chunk_before_removing_them(checkpoints, tmp_path, monkeypatch):
    """On NFS a file still open when it is removed stays as .nfsXXXX, and the folder cannot be removed."""
    open_at_removal, real_rmtree = [], shutil.rmtree
    monkeypatch.setattr(shutil, "rmtree", lambda path, **kw: (open_at_removal.append(open_files_under(path)),
                                                              real_rmtree(path, **kw)))
    sample_ddp.main(ddp_args(checkpoints[1], tmp_path / "samples.npz"))
    assert open_at_removal == [[]] and not (tmp_path / "samples.parts").exists()


def test_sample_ddp_streams_the_chunks_into_the_npz(checkpoints, tmp_path, monkeypatch):
    """The last step holds a few pieces of the images at a time, less than one chunk, not all of them (twice, as
    it did): 6 chunks of 10 images, each enlarged to 128 x 128 so that the images outweigh what else the step
    allocates, copied an image at a time."""
    image_bytes = 128 * 128 * 3
    monkeypatch.setattr(sample_ddp, "to_uint8", lambda x: utils.to_uint8(x).repeat(16, axis=1).repeat(16, axis=2))
    monkeypatch.setattr(sample_ddp, "PIECE_BYTES", image_bytes, raising=False)
    real_save, baseline = sample_ddp.save_npz, []

    def save_chunk(path, arrays):  # the last step starts after the last chunk is saved
        real_save(path, arrays)
        if os.path.basename(os.path.dirname(path)) == "samples.parts":
            tracemalloc.reset_peak()
            baseline.append(tracemalloc.get_traced_memory()[0])
    monkeypatch.setattr(sample_ddp, "save_npz", save_chunk)
    out = tmp_path / "samples.npz"
    tracemalloc.start()
    try:
        sample_ddp.main(ddp_args(checkpoints[1], out, "--num-fid-samples", "60", "--chunk-size", "10"))
        extra = tracemalloc.get_traced_memory()[1] - baseline[-1]
    finally:
        tracemalloc.stop()
    chunk_bytes = 10 * image_bytes
    print(f"the last step's peak: {extra} bytes over what it started with; a chunk: {chunk_bytes}, all: "
          f"{6 * chunk_bytes}")
    assert len(baseline) == 6 and extra < chunk_bytes
    with np.load(out) as f:
        assert f["arr_0"].shape == (60, 128, 128, 3)


def test_sample_ddp_rerun_after_a_complete_npz_does_nothing(reference_npz, checkpoints, tmp_path, monkeypatch,
                                                            capsys):
    """A clean-up that fails (NFS) is a warning, not a failed job; a re-run then does nothing but finish the
    clean-up, and a re-run with other settings stops before loading a model."""
    out, parts = tmp_path / "samples.npz", tmp_path / "samples.parts"

    def nfs_rmtree(path, **kwargs):
        raise OSError(errno.ENOTEMPTY, "Directory not empty", str(path))
    with monkeypatch.context() as m:
        m.setattr(shutil, "rmtree", nfs_rmtree)
        with pytest.warns(UserWarning, match="could not remove .*samples.parts.*the samples are complete"):
            sample_ddp.main(ddp_args(checkpoints[1], out))
    assert parts.exists()
    with np.load(out) as f:
        np.testing.assert_array_equal(f["arr_0"], reference_npz["arr_0"])
    written = os.stat(out).st_mtime_ns
    monkeypatch.setattr(sample_ddp, "generator_from_args", must_not_load)
    capsys.readouterr()
    sample_ddp.main(ddp_args(checkpoints[1], out))
    assert "holds the 30 images of these settings already: nothing to do" in capsys.readouterr().out
    assert not parts.exists() and os.stat(out).st_mtime_ns == written
    with pytest.raises(ValueError, match=r"samples\.npz \(its images were made with other settings.*global_seed is 0, "
                                         r"expected 1"):
        sample_ddp.main(ddp_args(checkpoints[1], out, "--global-seed", "1"))
    assert os.stat(out).st_mtime_ns == written


def test_sample_ddp_refuses_an_npz_without_settings(reference_npz, checkpoints, tmp_path, monkeypatch):
    out = tmp_path / "samples.npz"
    np.savez(out, arr_0=reference_npz["arr_0"])  # as an older version, or another program, wrote it
    monkeypatch.setattr(sample_ddp, "generator_from_args", must_not_load)
    with pytest.raises(ValueError, match="exists and records no settings"):
        sample_ddp.main(ddp_args(checkpoints[1], out))


def test_sample_ddp_two_processes_equal_one(reference_npz, checkpoints, tmp_path):
    out = tmp_path / "two.npz"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           os.path.join(ROOT, "sample_ddp.py"), *ddp_args(checkpoints[1], out), "--device", "cpu"]
    subprocess.run(cmd, check=True, cwd=tmp_path, capture_output=True, timeout=300)
    two = np.load(out)
    np.testing.assert_array_equal(two["arr_0"], reference_npz["arr_0"])
    np.testing.assert_array_equal(two["arr_1"], reference_npz["arr_1"])


def test_sample_ddp_batch_size_and_chunking_do_not_change_images(reference_npz, checkpoints, tmp_path):
    out = tmp_path / "other.npz"
    args = ddp_args(checkpoints[1], out)
    args[args.index("--per-proc-batch-size") + 1] = "7"
    args[args.index("--chunk-size") + 1] = "11"
    sample_ddp.main(args)
    np.testing.assert_allclose(np.load(out)["arr_0"].astype(int), reference_npz["arr_0"].astype(int), atol=1)


def interrupted_run(args, chunks, monkeypatch):
    """sample_ddp.main(args) killed after writing `chunks` chunks: their paths."""
    written = []
    real_save = sample_ddp.save_npz

    def save_then_die(path, arrays):
        if len(written) == chunks:
            raise KeyboardInterrupt
        real_save(path, arrays)
        written.append(path)

    with monkeypatch.context() as m:
        m.setattr(sample_ddp, "save_npz", save_then_die)
        with pytest.raises(KeyboardInterrupt):
            sample_ddp.main(args)
    return written


def test_sample_ddp_resumes_an_interrupted_run(reference_npz, checkpoints, tmp_path, monkeypatch):
    out = tmp_path / "resumed.npz"
    real_save = sample_ddp.save_npz
    kept = {path: os.stat(path).st_mtime_ns for path in interrupted_run(ddp_args(checkpoints[1], out), 2, monkeypatch)}
    assert not out.exists() and len(kept) == 2

    made = []
    monkeypatch.setattr(sample_ddp, "save_npz", lambda path, arrays: (made.append(path), real_save(path, arrays)))
    sample_ddp.main(ddp_args(checkpoints[1], out))
    assert not set(made) & set(kept), "completed chunks were made again"
    assert len(made) == 2  # 4 chunks of 8 for 30 images
    resumed = np.load(out)
    np.testing.assert_array_equal(resumed["arr_0"], reference_npz["arr_0"])
    np.testing.assert_array_equal(resumed["arr_1"], reference_npz["arr_1"])


def must_not_load(*args, **kwargs):
    raise AssertionError("the run loaded its model")


@pytest.mark.parametrize("change, field", [
    (["--cfg-scale", "4.0"], "cfg_scale"), (["--global-seed", "1"], "global_seed"),
    (["--labels", "balanced"], "labels"), (["--chunk-size", "6"], "chunk_size"),
    (["--num-fid-samples", "40"], "num_fid_samples"), (["--num-sampling-steps", "8"], "num_sampling_steps"),
    (["--sampler", "ddpm"], "sampler"), (["--precision", "bf16"], "precision")])
def test_sample_ddp_refuses_chunks_made_with_other_settings(checkpoints, tmp_path, monkeypatch, change, field):
    """A re-run that would mix images of two settings into one .npz stops, naming the setting,
    before it loads a model; the chunks already made stay as they are."""
    out = tmp_path / "samples.npz"
    (kept,) = interrupted_run(ddp_args(checkpoints[0], out, "--num-sampling-steps", "2"), 1, monkeypatch)
    before = os.stat(kept).st_mtime_ns
    monkeypatch.setattr(sample_ddp, "generator_from_args", must_not_load)
    with pytest.raises(ValueError, match=rf"settings\.json.*\b{field}\b"):
        sample_ddp.main(ddp_args(checkpoints[0], out, "--num-sampling-steps", "2", *change))
    assert os.stat(kept).st_mtime_ns == before and not out.exists()


def test_sample_ddp_refuses_chunks_of_another_checkpoint(checkpoints, tmp_path, monkeypatch):
    out, student = tmp_path / "samples.npz", str(tmp_path / "student.pt")
    shutil.copy(checkpoints[1], student)
    interrupted_run(ddp_args(student, out), 1, monkeypatch)
    monkeypatch.setattr(sample_ddp, "generator_from_args", must_not_load)
    with pytest.raises(ValueError, match=r"settings\.json.*\bckpt\b"):
        sample_ddp.main(ddp_args(checkpoints[0], out))
    # the same path rewritten (a longer run, a new export) holds another checkpoint
    torch.save(torch.load(student, weights_only=True), student)
    with pytest.raises(ValueError, match=r"settings\.json.*\bckpt\b"):
        sample_ddp.main(ddp_args(student, out))


def test_sample_ddp_refuses_chunks_of_unknown_settings(checkpoints, tmp_path, monkeypatch):
    out = tmp_path / "samples.npz"
    interrupted_run(ddp_args(checkpoints[1], out), 1, monkeypatch)
    os.remove(tmp_path / "samples.parts" / "settings.json")  # as an older version left it
    monkeypatch.setattr(sample_ddp, "generator_from_args", must_not_load)
    with pytest.raises(ValueError, match="no settings.json"):
        sample_ddp.main(ddp_args(checkpoints[1], out))


def test_balanced_labels_cycle_through_classes(checkpoints, tmp_path):
    out = tmp_path / "balanced.npz"
    sample_ddp.main(ddp_args(checkpoints[0], out, "--labels", "balanced", "--num-sampling-steps", "2"))
    np.testing.assert_array_equal(np.load(out)["arr_1"], np.arange(30) % 10)


@pytest.mark.parametrize("extra, message", [(["--cfg-scale", "0.9"], "cfg-scale"), (["--chunk-size", "0"], "positive")])
def test_sample_ddp_rejects_bad_flags(checkpoints, tmp_path, extra, message, capsys):
    with pytest.raises(SystemExit):
        sample_ddp.main(ddp_args(checkpoints[1], tmp_path / "x.npz", *extra))
    assert message in capsys.readouterr().err
    with pytest.raises(SystemExit):
        sample_ddp.main(ddp_args(checkpoints[1], tmp_path / "x.png"))


def test_a_log_file_gets_plain_progress_lines(checkpoints, tmp_path, capsys):
    sample_ddp.main(ddp_args(checkpoints[1], tmp_path / "samples.npz"))
    out, err = capsys.readouterr()
    assert "\r" not in out + err and re.search(r"sampling: (\d+)/\1 img \(100%\)", out)


def uint8_difference_of_bf16_decode(device_type):
    """(fraction of uint8 values that differ, largest difference) between the bf16-autocast and the
    fp32 decode of a tiny random diffusers VAE (the hub layout's AutoencoderKL)."""
    from models import Autoencoder
    from tiny_pixart import tiny_vae
    from utils import to_uint8
    autoencoder = Autoencoder(tiny_vae(), 0.13025).to(device_type)
    latents = torch.randn(8, 4, 16, 16, generator=torch.Generator().manual_seed(0)).to(device_type)
    fp32 = to_uint8(autoencoder.decode(latents).clamp(-1, 1)).astype(int)
    with torch.autocast(device_type, dtype=torch.bfloat16):
        bf16 = to_uint8(autoencoder.decode(latents).float().clamp(-1, 1)).astype(int)
    return (fp32 != bf16).mean(), np.abs(fp32 - bf16).max()


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="no CUDA"))])
def test_bf16_decode_moves_uint8_pixels_by_at_most_two_levels(device):
    """Measured on the CPU: 25.2% of the values differ, none by more than 2 of 255."""
    fraction, largest = uint8_difference_of_bf16_decode(device)
    print(f"bf16 decode on {device}: {100 * fraction:.1f}% of uint8 values differ from fp32, at most by {largest}")
    assert fraction < 0.35 and largest <= 2


def test_sample_ddp_decodes_under_the_decode_precision(checkpoints, tmp_path, monkeypatch):
    """fp32 by default, bf16 on request (an autocast on CUDA, nothing on the CPU); the samples under
    their own --precision."""
    precisions = []
    monkeypatch.setattr(sample_ddp, "autocast", lambda device, precision: (precisions.append(precision),
                                                                             contextlib.nullcontext())[1])
    sample_ddp.main(ddp_args(checkpoints[1], tmp_path / "a.npz", "--num-fid-samples", "3"))
    assert precisions == ["fp32", "fp32"]
    precisions.clear()
    sample_ddp.main(ddp_args(checkpoints[1], tmp_path / "b.npz", "--num-fid-samples", "3", "--decode-precision",
                             "bf16"))
    assert precisions == ["fp32", "bf16"]


def enable_tf32(monkeypatch):
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", True)
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", True)


def tf32_allowed():
    """(for matmuls, for cuDNN's convolutions)"""
    return torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32


def test_fp32_sampling_is_ieee_fp32_not_tf32(checkpoints, tmp_path, monkeypatch):
    """--precision fp32 and --decode-precision fp32 mean IEEE fp32: TF32 off, also for cuDNN, where torch allows it
    by default."""
    enable_tf32(monkeypatch)
    sample_ddp.main(ddp_args(checkpoints[1], tmp_path / "a.npz", "--num-fid-samples", "3"))
    assert tf32_allowed() == (False, False)
    enable_tf32(monkeypatch)
    sample.main(["--ckpt", checkpoints[1], "--class-labels", "1", "--out", str(tmp_path / "grid.png")])
    assert tf32_allowed() == (False, False)


def test_a_pipeline_folder_whose_weights_are_rewritten_in_place_is_another_checkpoint(tmp_path):
    weights = tmp_path / "pipeline" / "transformer" / "diffusion_pytorch_model.safetensors"
    weights.parent.mkdir(parents=True)
    weights.write_bytes(b"old")
    before = sample_ddp.checkpoint_identity(str(tmp_path / "pipeline"), hub_names=True)
    folder_time = os.stat(tmp_path / "pipeline").st_mtime_ns
    weights.write_bytes(b"new weights")
    assert os.stat(tmp_path / "pipeline").st_mtime_ns == folder_time  # the folder itself looks unchanged
    after = sample_ddp.checkpoint_identity(str(tmp_path / "pipeline"), hub_names=True)
    assert after != before and after["bytes"] == len(b"new weights")
    file = tmp_path / "student.pt"
    file.write_bytes(b"12345")
    assert sample_ddp.checkpoint_identity(str(file))["bytes"] == 5
