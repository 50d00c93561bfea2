"""A reduced demo, end to end: the same scripts as `python demo.py`, on a tiny teacher and a few steps."""
import json
import os

import pytest
import torch
from PIL import Image

import demo
from ard import ARD
from models import DiT
from test_ard import inputs, perturbed_dit

RECIPES = ("teacher-forced", "ema-fed")  # the demo's


def test_reduced_demo_writes_table_grids_and_plots(tmp_path, capsys):
    torch.manual_seed(0)
    net = DiT(input_size=8, patch_size=2, in_channels=1, hidden_size=32, depth=2, num_heads=2, num_classes=10)
    teacher = str(tmp_path / "teacher.pt")
    torch.save({"model": net.state_dict(), "ema": net.state_dict(), "opt": {}, "step": 0,
                "args": {"stage": "teacher", "dit": net.config, "image_size": 8, "vae": "none"}}, teacher)
    out = tmp_path / "demo"
    argv = ["--out", str(out), "--teacher", teacher, "--iterations", "4", "--batch-size", "16",
            "--num-trajectories", "32", "--num-held-out", "16", "--num-images", "40"]
    demo.main(argv)

    report = (out / "results.md").read_text()
    rows = [line for line in report.splitlines() if line.startswith("| ")][2:]
    students = [(name, recipe) for recipe in RECIPES for name in ("step distillation (N=0)", "ARD (N=1)")]
    assert [(r.split("|")[1].strip(), r.split("|")[2].strip()) for r in rows] == [
        ("teacher, DDIM 25", "-"), ("teacher, DDIM 4", "-"), *students]
    for row in rows:
        cells = row.strip("|").split("|")
        fid, precision, recall, mflops, ms = (float(cells[i]) for i in (3, 4, 5, 8, 9))
        assert fid >= 0 and 0 <= precision <= 1 and 0 <= recall <= 1 and mflops > 0 and ms > 0
    ratio_lines = [line for line in report.splitlines() if line.startswith("- gap ratio")]
    assert len(ratio_lines) == 2 and all(any(r in line for line in ratio_lines) for r in RECIPES)
    assert report in capsys.readouterr().out
    digits = out / "digits"
    for key in ("teacher_ddim25", "teacher_ddim4", *(f"K4-N{n}-state-{r}-s0" for n in (0, 1) for r in RECIPES)):
        assert Image.open(digits / f"grid_{key}.png").size[0] > 0
    for plot in ("exposure_bias.png", "fid_vs_history.png"):
        assert Image.open(digits / plot).size[0] > 0
    [fed_ckpt] = (digits / "runs").glob("*-ard-K4-N0-state-ema-fed-s0/checkpoints/*.pt")
    fed_args = torch.load(fed_ckpt, weights_only=True)["args"]
    assert (fed_args["student_fed"], fed_args["student_fed_ramp"], fed_args["student_fed_ema"]) == (0.5, 2, True)
    fed = json.loads((digits / "metrics" / "K4-N0-state-ema-fed-s0.json").read_text())
    assert len(fed["free_errors"]) == len(fed["forced_errors"]) == 4
    # the N=0 student's first step is teacher-forced by construction: both errors agree there
    assert fed["free_errors"][0] == pytest.approx(fed["forced_errors"][0], rel=1e-6, abs=1e-9)
    assert len(fed["history_reliance"]) == 3

    # a second run reuses every finished stage; --report trains nothing and skips the unfinished seed
    mtimes = {p: os.stat(p).st_mtime_ns for p in (digits / "runs").glob("*/checkpoints/*.pt")}
    demo.main(argv)
    assert {p: os.stat(p).st_mtime_ns for p in (digits / "runs").glob("*/checkpoints/*.pt")} == mtimes
    demo.main(argv + ["--report", "--seeds", "0", "1"])
    assert {p: os.stat(p).st_mtime_ns for p in (digits / "runs").glob("*/checkpoints/*.pt")} == mtimes
    assert (out / "results.md").read_text().split("\n")[2:] == report.split("\n")[2:]


def test_mean_spread_and_gap_ratios():
    assert demo.mean_spread([3.0]) == "3.00"
    assert demo.mean_spread([1.0, 2.0, 4.0], digits=1) == "2.3 ± 1.5"
    ard, base = demo.Student(4, 1, "state", "student-fed"), demo.Student(4, 0, "state", "student-fed")
    rows = {ard: {0: {"fid": 12.0}, 1: {"fid": 14.0}}, base: {0: {"fid": 20.0}, 1: {"fid": 30.0}}}
    assert demo.gap_ratios(rows, 10.0, ard, base) == [0.2, 0.2]
    assert demo.gap_ratios({ard: rows[ard]}, 10.0, ard, base) == []


def test_diagnostics_are_ratios_to_the_teacher_forced_error():
    row = dict(free_errors=[1.0, 2.0, 6.0], forced_errors=[1.0, 2.0, 3.0], history_reliance=[1.0, 6.0])
    assert demo.diagnostics(row) == dict(exposure_bias=2.0, history_reliance=1.25)


@pytest.mark.parametrize("history_layers", [0, 1, 4])
def test_history_reliance_is_zero_exactly_when_stages_cannot_see_their_history(history_layers):
    student = ARD(perturbed_dit(), num_steps=4, history_layers=history_layers).eval()
    stages, y = inputs(batch=5)
    with torch.no_grad():
        changes = demo.history_reliance(student, stages, y, student(stages, y))
    assert len(changes) == 3
    if history_layers:
        assert min(changes) > 1e-7
    else:
        assert changes == [0.0] * 3


def test_report_does_not_train_a_missing_teacher(tmp_path, monkeypatch):
    monkeypatch.setattr(demo.train, "main", lambda argv: pytest.fail(f"train.py ran: {argv}"))
    with pytest.raises(FileNotFoundError, match=r"no finished teacher run 'digits' .* \(--report trains nothing\)"):
        demo.main(["--out", str(tmp_path), "--teacher", "train", "--report"])
