"""A reduced demo, end to end: the same scripts as `python demo.py`, on a tiny teacher and a few steps."""
import json
import os

import torch
from PIL import Image

import demo
from models import DiT


def test_reduced_demo_writes_table_grids_and_plots(tmp_path, capsys):
    torch.manual_seed(0)
    net = DiT(input_size=8, patch_size=2, in_channels=1, hidden_size=32, depth=2, num_heads=2, num_classes=10)
    teacher = str(tmp_path / "teacher.pt")
    torch.save({"model": net.state_dict(), "ema": net.state_dict(), "opt": {}, "step": 0,
                "args": {"stage": "teacher", "dit": net.config, "image_size": 8, "vae": "none"}}, teacher)
    out = tmp_path / "demo"
    argv = ["--out", str(out), "--teacher", teacher, "--iterations", "3", "--batch-size", "16",
            "--num-trajectories", "32", "--num-held-out", "16", "--num-images", "40"]
    demo.main(argv)

    report = (out / "results.md").read_text()
    rows = [line for line in report.splitlines() if line.startswith("| ")][2:]
    assert [r.split("|")[1].strip() for r in rows] == [
        "teacher, DDIM 25", "teacher, DDIM 4", "step distillation (N=0)", "ARD (N=1)", "ARD (N=2)"]
    for row in rows:
        fid, precision, recall, mflops, ms = (float(c) for c in row.strip("|").split("|")[2:7])
        assert fid >= 0 and 0 <= precision <= 1 and 0 <= recall <= 1 and mflops > 0 and ms > 0
    assert "FID gap to the teacher" in report and report in capsys.readouterr().out
    for key in ("teacher_ddim25", "teacher_ddim4", "N0_state", "N1_state", "N2_state"):
        assert Image.open(out / f"grid_{key}.png").size[0] > 0
    for plot in ("exposure_bias.png", "fid_vs_history.png"):
        assert Image.open(out / plot).size[0] > 0
    errors = json.loads((out / "stage_errors.json").read_text())
    assert set(errors) == {"step distillation (N=0)", "ARD (N=1)", "ARD (N=2)"}
    assert all(len(free) == len(forced) == 4 for free, forced in errors.values())
    # the N=0 student's first step is teacher-forced by construction: both errors agree there
    free, forced = errors["step distillation (N=0)"]
    assert abs(free[0] - forced[0]) <= 1e-6 * max(1.0, forced[0])

    # a second run reuses every finished stage
    mtimes = {p: os.stat(p).st_mtime_ns for p in (out / "runs").glob("*/checkpoints/*.pt")}
    demo.main(argv)
    assert {p: os.stat(p).st_mtime_ns for p in (out / "runs").glob("*/checkpoints/*.pt")} == mtimes
