"""LightningDiT and REPA-E through the shared scripts on a VA-VAE (all tiny and random, in their official layouts):
extraction on their own solves, ARD students with euler heads trained and resumed bit-identically, samples of the
students and the teachers' own rows (REPA-E's by SiT's dopri5) decoded through the VA-VAE's per-channel statistics."""
import json
import os

import pytest
import torch

import numpy as np

import extract_trajectories as et
import sample
import sample_ddp
import test_extract as te
import test_lightningdit as tl
import test_repa_e as tr
import test_train as tt
import test_vavae as tv
from test_vavae import va_vae  # noqa: F401 (a fixture)

# What each teacher's file, solve and scripts take: LightningDiT's official sampler (Euler on the 0.3-shifted grid,
# 3 guided channels off below t = 0.125) and REPA-E's (Heun, every channel guided at σ <= 0.75).
TEACHERS = {
    "lightningdit": dict(save=lambda path: torch.save({"ema": tl.random_official_state()}, path), load=[],
                         convention="sit", arch="lightningdit",
                         solve=["--time-shift", repr(1 / 0.3), "--guidance-channels", "3",
                                "--guidance-interval", "0", "0.875"], row=[]),
    "repa-e": dict(save=lambda path: tr.repa_e_checkpoint(path, num_classes=1000), convention="repa", arch=None,
                   load=["--model", "DiT-S/2", "--image-size", str(tr.SIZE)],
                   solve=["--solver", "heun", "--guidance-channels", "32", "--guidance-interval", "0", "0.75"],
                   row=["--solver", "dopri5"]),
}


@pytest.mark.parametrize("kind", list(TEACHERS))
def test_teacher_extracts_distils_resumes_and_samples(kind, va_vae, tmp_path):
    teacher = TEACHERS[kind]
    ckpt, traj = str(tmp_path / f"{kind}.pt"), str(tmp_path / "traj")
    teacher["save"](ckpt)
    load = ["--teacher-family", "flow", "--vae", va_vae, *teacher["load"]]
    et.main(te.argv(ckpt, traj, *load, *teacher["solve"], "--teacher-steps", "8", "--num-samples", "16",
                    "--shard-size", "8", "--batch-size", "8"))
    meta = json.load(open(os.path.join(traj, "meta.json")))
    assert (meta["shape"], meta["vae"], meta["time_convention"]) == ([tv.Z, 4, 4], va_vae, teacher["convention"])

    def argv(results, iterations):
        return tt.ard_argv(ckpt, traj, results, *load, "--parametrization", "euler", "--iterations", iterations,
                           "--ckpt-every", iterations)
    whole = tt.run(argv(tmp_path / "whole", 2))
    part = tt.run(argv(tmp_path / "part", 1))
    tt.run(["--resume", part, "--iterations", 2])
    tt.assert_same_training_state(tt.load(tt.ckpt(whole, 2)), tt.load(tt.ckpt(part, 2)))
    out = tmp_path / "grid.png"
    sample.main(["--ckpt", tt.ckpt(part, 2), "--class-labels", "1", "2", "--out", str(out), "--device", "cpu"])
    assert out.exists() and tt.load(tt.ckpt(part, 2))["args"]["dit"].get("arch") == TEACHERS[kind]["arch"]
    few = ["--num-fid-samples", "4", "--chunk-size", "4", "--per-proc-batch-size", "2"]
    sample_ddp.main(["--ckpt", tt.ckpt(part, 2), *few, "--out", str(tmp_path / "student.npz")])
    sample_ddp.main(["--ckpt", ckpt, *load, *teacher["solve"], *teacher["row"], "--num-sampling-steps", "4", *few,
                     "--out", str(tmp_path / "teacher.npz")])
    for npz in ("student.npz", "teacher.npz"):
        assert np.load(tmp_path / npz)["arr_0"].shape == (4, tr.SIZE, tr.SIZE, 3)
