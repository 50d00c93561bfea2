"""A reduced demo, end to end: the same scripts as `python demo.py`, on a tiny teacher and a few steps."""
import json
import os
from pathlib import Path

import pytest
import torch
from PIL import Image

import demo
from ard import ARD
from evaluations.small import shipped_classifier
from extract_trajectories import TrajectoryDataset
from models import DiT, read_checkpoint
from test_ard import inputs, perturbed_dit
from test_flow_teachers import make_flow_teacher
from utils import sha256_of

STUDENTS = [(name, "ddim") for name in ("step distillation (N=0)", "ARD (N=1)")]
FINE_TUNED = [(f"{name}, R+D ({demo.DEMO_ADVERSARY})", heads) for name, heads in STUDENTS]


def tiny_teacher(tmp_path):
    torch.manual_seed(0)
    net = DiT(input_size=8, patch_size=2, in_channels=1, hidden_size=32, depth=2, num_heads=2, num_classes=10)
    path = str(tmp_path / "teacher.pt")
    torch.save({"model": net.state_dict(), "ema": net.state_dict(), "opt": {}, "step": 0,
                "args": {"stage": "teacher", "dit": net.config, "image_size": 8, "vae": "none"}}, path)
    return path


def checkpoints(digits):
    return {p: os.stat(p).st_mtime_ns for p in (digits / "runs").glob("*/checkpoints/[0-9]*")}


def test_reduced_demo_writes_table_comparisons_grids_and_plots(tmp_path, capsys):
    out = tmp_path / "demo"
    argv = ["--out", str(out), "--teacher", tiny_teacher(tmp_path), "--iterations", "4", "--batch-size", "16",
            "--num-trajectories", "32", "--num-held-out", "16", "--num-images", "40", "--gan-iterations", "2"]
    demo.main(argv)

    report = (out / "results.md").read_text()
    rows = [line for line in report.splitlines() if line.startswith("| ")][2:]
    assert report_rows(report) == [("teacher, DDIM 25", "-"), ("teacher, DDIM 4", "-"), *STUDENTS, *FINE_TUNED]
    network = sha256_of(shipped_classifier("digits"))[:12]
    assert f"features of the shipped digits network digits_classifier.pt (sha256 {network}); teacher" in report
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        fid, precision, recall, mflops, ms = (float(cells[i]) for i in (4, 6, 7, 12, 13))
        assert fid >= 0 and 0 <= precision <= 1 and 0 <= recall <= 1 and mflops > 0 and ms > 0
    for row in rows[2:]:  # students: fidelity to the teacher and the diagnostics
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert float(cells[8]) >= 0 and float(cells[9]) > 0 and float(cells[10]) > 0
    comparisons = [line for line in report.splitlines() if line.startswith("- ")]
    assert len(comparisons) == 6 and all(line.endswith(("differs", "no difference", "at K=4)")) for line in comparisons)
    assert_fine_tuned_students_compared(comparisons)
    assert report in capsys.readouterr().out
    digits = out / "digits"
    assert len(list(digits.glob("grid_*.png"))) == 6
    assert_fine_tuned_from_their_regression_runs(digits)
    for plot in ("exposure_bias.png", "fid_vs_history.png"):
        assert Image.open(digits / plot).size[0] > 0
    [row] = [json.loads(p.read_text()) for p in (digits / "metrics").glob("K4-N0-ddim-teacher-forced-s0-*.json")]
    assert len(row["free_errors"]) == len(row["forced_errors"]) == 4 and len(row["history_reliance"]) == 3
    # the N=0 student's first step is teacher-forced by construction: both errors agree there
    assert row["free_errors"][0] == pytest.approx(row["forced_errors"][0], rel=1e-6, abs=1e-9)

    # an unchanged re-run trains nothing and says so; --report trains nothing and skips the missing seed
    trained = checkpoints(digits)
    demo.main(argv)
    assert checkpoints(digits) == trained and "reusing" in capsys.readouterr().out
    demo.main(argv + ["--report", "--seeds", "0", "1"])
    assert checkpoints(digits) == trained
    assert (out / "results.md").read_text().split("\n")[2:] == report.split("\n")[2:]
    # another evaluation setting measures again but trains nothing; another adversarial stage trains the R+D
    # students again from the same R runs
    metrics = set((digits / "metrics").glob("*.json"))
    demo.main([*argv, "--num-images", "44"])
    assert checkpoints(digits) == trained and len(set((digits / "metrics").glob("*.json")) - metrics) == 6
    demo.main([*argv, "--gan-iterations", "3"])
    retrained = set(checkpoints(digits)) - set(trained)
    assert set(trained) < set(checkpoints(digits)) and {p.parts[-3].split("-")[1] for p in retrained} == {"gan"}
    assert len(retrained) == 2


def assert_fine_tuned_students_compared(comparisons):
    """Each R+D student against the 25-step teacher and its R twin, and two gap ratios: R's and R+D's."""
    pairs = [line.split(": FID")[0] for line in comparisons]
    ddim = ", ddim heads, teacher-forced, K=4"
    fine_tuned = f"R+D ({demo.DEMO_ADVERSARY}){ddim}"
    for name in ("step distillation (N=0)", "ARD (N=1)"):
        assert f"- {name}, {fine_tuned} against {name}{ddim}" in pairs
        assert f"- {name}, {fine_tuned} against the 25-step teacher" in pairs
    ratios = [pair for pair, line in zip(pairs, comparisons) if "gap ratio" in line and ddim in pair]
    assert ratios == [f"- ARD (N=1){ddim} against step distillation (N=0){ddim}",
                      f"- ARD (N=1), {fine_tuned} against step distillation (N=0), {fine_tuned}"]


def assert_fine_tuned_from_their_regression_runs(digits):
    """The R+D runs are train.py --stage gan from the final checkpoint of their R twin's run (4 steps), counting
    their own adversarial steps (2)."""
    runs = [read_checkpoint(p) for p in (digits / "runs").glob("*-gan-*/checkpoints/[0-9]*")]
    assert {(r["args"]["stage"], r["args"]["real_data"], r["step"]) for r in runs} == {("gan", "digits", 2)}
    inits = sorted(Path(r["args"]["init"]) for r in runs)
    assert [i.parents[1].name.split("-", 1)[1].rsplit("-", 1)[0] for i in inits] == [
        "ard-K4-N0-ddim-teacher-forced-s0", "ard-K4-N1-ddim-teacher-forced-s0"]
    assert {(i.parents[2], i.name) for i in inits} == {(digits / "runs", "0000004")}


def report_rows(report):
    """(model, heads) of each row of a results table."""
    rows = [line for line in report.splitlines() if line.startswith("| ")][2:]
    return [(r.split("|")[1].strip(), r.split("|")[2].strip()) for r in rows]


def solver_read_students_only(monkeypatch):
    """The demo's grid cut to its two solver-read students (the direct-head pair runs the same scripts)."""
    monkeypatch.setattr(demo, "demo_grid",
                        lambda depth, heads, adversarial: [demo.Student(4, n, heads) for n in (0, 1)])


def test_reduced_gan_study_traces_its_stage(tmp_path, monkeypatch):
    """The study's traced R+D run keeps a checkpoint at every quarter of its stage; each is measured, the whole
    stage is compared with its first half, and the stage's plots are drawn from the metrics and the run's log."""
    grid = [demo.Student(4, 0, "ddim"), demo.Student(4, 0, "ddim", stage="R+D")]
    monkeypatch.setattr(demo, "study_grid", lambda dataset, depth, heads: grid)
    out = tmp_path / "study"
    demo.main(["--study", "--dataset", "digits", "--seeds", "0", "--out", str(out), "--teacher", tiny_teacher(tmp_path),
               "--iterations", "2", "--gan-iterations", "4", "--batch-size", "16", "--num-trajectories", "32",
               "--num-held-out", "16", "--num-images", "40"])
    digits = out / "digits"
    [run] = (digits / "runs").glob("*-gan-*")
    assert sorted(p.name for p in (run / "checkpoints").glob("[0-9]*")) == [f"{s:07d}" for s in (1, 2, 3, 4)]
    traced = sorted(p.name.split("-s0-")[0] for p in (digits / "metrics").glob("K4-N0-ddim-teacher-forced-R+D*.json"))
    assert traced == ["K4-N0-ddim-teacher-forced-R+D", *(f"K4-N0-ddim-teacher-forced-R+D-{s:07d}" for s in (1, 2, 3))]
    report = (out / "results.md").read_text()
    assert "step distillation (N=0), R+D, ddim heads, teacher-forced, K=4, the whole stage against its first 2 steps" \
        in report
    logged = demo.training_log(str(run / "checkpoints" / "0000004"))
    assert logged["d_acc"][0] == [1, 2, 3, 4] and all(0 <= a <= 1 for a in logged["d_acc"][1])
    for plot in ("gan_stage.png", "gan_training.png"):
        assert Image.open(digits / plot).size[0] > 0


def test_reduced_demo_on_a_flow_teacher_solves_with_heun_and_reads_heads_through_euler(tmp_path, monkeypatch):
    solver_read_students_only(monkeypatch)
    teacher = str(tmp_path / "flow_teacher.pt")
    make_flow_teacher(teacher)
    out = tmp_path / "demo"
    demo.main(["--out", str(out), "--teacher", teacher, "--teacher-family", "flow", "--iterations", "2",
               "--batch-size", "16", "--num-trajectories", "32", "--num-held-out", "16", "--num-images", "40"])
    report = (out / "results.md").read_text()
    students = [("step distillation (N=0)", "euler"), ("ARD (N=1)", "euler")]
    assert report_rows(report) == [("teacher, Heun 25", "-"), ("teacher, Heun 4", "-"), *students]
    assert "teacher 25-step Heun" in report and len([l for l in report.splitlines() if l.startswith("- ")]) == 1
    meta = json.loads(next((out / "digits-flow").glob("trajectories_*/meta.json")).read_text())
    assert (meta["teacher_family"], meta["solver"], meta["last_step"]) == ("flow", "heun", "euler")
    runs = [read_checkpoint(p)["args"] for p in (out / "digits-flow" / "runs").glob("*/checkpoints/[0-9]*")]
    assert sorted(a["parametrization"] for a in runs) == ["euler", "euler"]
    assert {a["teacher_family"] for a in runs} == {"flow"}


def test_demo_without_a_shipped_teacher_of_the_family_stops_first(capsys):
    with pytest.raises(SystemExit):
        demo.main(["--teacher-family", "flow", "--dataset", "shapes"])
    assert "no shipped flow teacher" in capsys.readouterr().err


def test_demo_never_evaluates_on_noise_a_student_trained_on(tmp_path, monkeypatch):
    """Every noise the reduced demo draws for evaluation (samples, held-out trajectories) against the x_T of
    every trajectory its students trained on, read back from the shards."""
    solver_read_students_only(monkeypatch)
    drawn = []

    def spy(module):
        original = module.index_noise_and_labels

        def record(*args, **kwargs):
            noise, labels = original(*args, **kwargs)
            drawn.append((module.__name__, kwargs.get("stream", args[5] if len(args) > 5 else "trajectories"), noise))
            return noise, labels
        monkeypatch.setattr(module, "index_noise_and_labels", record)
    spy(demo.sample_ddp)
    spy(demo.extract_trajectories)
    out = tmp_path / "demo"
    demo.main(["--out", str(out), "--teacher", tiny_teacher(tmp_path), "--iterations", "2", "--batch-size", "16",
               "--num-trajectories", "32", "--num-held-out", "16", "--num-images", "40", "--seeds", "0", "1"])
    trained = torch.cat([TrajectoryDataset(str(d))[i][0][0][None] for d in (out / "digits").glob("trajectories_*")
                         for i in range(32)]).flatten(1)
    evaluation = torch.cat([n for module, stream, n in drawn
                            if module == "sample_ddp" or stream == "evaluation"]).flatten(1)
    assert len(trained) == 2 * 32 and len(evaluation) >= 2 * (2 * 40 + 16)
    assert {stream for module, stream, _ in drawn if module == "sample_ddp"} == {"evaluation"}
    distances = torch.cdist(evaluation, trained.float())
    assert distances.min() > 1.0  # no evaluation noise is (or is near) a training x_T


def test_mean_spread_and_verdicts():
    assert demo.mean_spread([3.0]) == "3.00"
    assert demo.mean_spread([1.0, 2.0, 4.0], digits=1) == "2.3 ± 1.5"
    assert demo.verdict([-1.0, -2.0], [-2.5, -0.5], 0) == "differs"
    assert demo.verdict([-1.0, 0.5], [-2.5, -0.5], 0) == "no difference"  # the seeds disagree
    assert demo.verdict([-1.0, -2.0], [-2.5, 0.5], 0) == "no difference"  # the interval holds 0


def test_comparisons_are_fixed_by_the_grid():
    grid = demo.study_grid("digits", depth=4)
    assert len(grid) == len(set(grid)) == 22 and len(demo.study_grid("shapes", depth=4)) == 11
    zeros = demo.Student(4, 1, "ddim", history="zeros")
    assert zeros.comparisons(grid) == [demo.Student(4, 0, "ddim"), demo.Student(4, 1, "ddim")]
    assert demo.Student(4, 1, "direct").comparisons(grid) == [demo.Student(4, 0, "direct")]
    assert demo.Student(2, 1, "ddim").comparisons(grid) == [demo.Student(2, 0, "ddim")]
    assert demo.Student(4, 1, "ddim", recipe="ema-fed").comparisons(grid) == [
        demo.Student(4, 0, "ddim", recipe="ema-fed"), demo.Student(4, 1, "ddim")]
    fine_tuned = {a: demo.Student(4, 1, "ddim", stage="R+D", adversary=a) for a in demo.ADVERSARIES}
    control, regression = fine_tuned["no adversary"], demo.Student(4, 1, "ddim")
    assert fine_tuned["paper"].comparisons(grid) == [demo.Student(4, 0, "ddim", stage="R+D"), control, regression]
    assert fine_tuned[demo.DEMO_ADVERSARY].comparisons(grid) == [
        demo.Student(4, 0, "ddim", stage="R+D", adversary=demo.DEMO_ADVERSARY), fine_tuned["paper"], control,
        regression]
    assert control.comparisons(grid) == [demo.Student(4, 0, "ddim", stage="R+D", adversary="no adversary"), regression]
    assert all(fine_tuned[a].comparisons(grid) == [fine_tuned["paper"]] for a in demo.ADVERSARIES
               if a not in demo.TRACED_ADVERSARIES)


def test_diagnostics_are_ratios_to_the_teacher_forced_error():
    row = dict(free_errors=[1.0, 2.0, 6.0], forced_errors=[1.0, 2.0, 3.0], history_reliance=[1.0, 6.0])
    assert demo.diagnostics(row) == dict(exposure_bias=2.0, history_reliance=1.25)


@pytest.mark.parametrize("history_layers", [0, 1, 4])
def test_history_reliance_is_zero_exactly_when_stages_cannot_see_their_history(history_layers):
    student = ARD(perturbed_dit(), num_steps=4, history_layers=history_layers).eval()
    stages, y = inputs(batch=5)
    with torch.no_grad():
        changes = demo.history_reliance(student, stages, (y,), student(stages, y))
    assert len(changes) == 3
    if history_layers:
        assert min(changes) > 1e-7
    else:
        assert changes == [0.0] * 3


def test_report_does_not_train_a_missing_teacher(tmp_path, monkeypatch):
    monkeypatch.setattr(demo.train, "main", lambda argv: pytest.fail(f"train.py ran: {argv}"))
    with pytest.raises(FileNotFoundError, match=r"no finished teacher run 'digits' .* \(--report trains nothing\)"):
        demo.main(["--out", str(tmp_path), "--teacher", "train", "--report"])


def test_reduced_demo_on_captioned_shapes_scores_adherence_beside_fid(tmp_path):
    from data import caption_words
    from tiny_pixart import save_tiny_pixel_pipeline
    teacher = save_tiny_pixel_pipeline(tmp_path / "pipeline", words=caption_words(), patch_size=4)
    out = tmp_path / "demo"
    demo.main(["--out", str(out), "--dataset", "shapes-text", "--teacher", teacher, "--iterations", "2",
               "--batch-size", "8", "--num-trajectories", "16", "--num-held-out", "8", "--num-images", "24"])
    report = (out / "results.md").read_text()
    assert report_rows(report) == [("teacher, DDIM 25", "-"), ("teacher, DDIM 4", "-"),
                                   ("step distillation (N=0)", "ddim"), ("ARD (N=1)", "ddim")]
    header = [line for line in report.splitlines() if line.startswith("| ")][0]
    assert "| recall | kind | pattern | colour | all named | FD to teacher |" in header and "CFG 4.5" in report
    for row in [line for line in report.splitlines() if line.startswith("| ")][2:]:
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert all(0 <= float(cells[i]) <= 1 for i in range(8, 12)) and float(cells[-2]) > 0
    assert "ceiling" in report and "floor" in report
    comparisons = [line for line in report.splitlines() if line.startswith("- ")]
    assert len(comparisons) == 3 and sum("all-named adherence" in line for line in comparisons) == 3
    folder = out / "shapes-text"
    prompts = (folder / "prompts.txt").read_text().splitlines()
    [train_prompts] = folder.glob("train_prompts_n16_s0.txt")
    assert len(prompts) == 5000 and len(train_prompts.read_text().splitlines()) == 16
    meta = json.loads(next(folder.glob("trajectories_*/meta.json")).read_text())
    assert (meta["condition"], meta["num_prompts"], meta["cfg_scale"]) == ("prompts", 16, 4.5)
    [row] = [json.loads(p.read_text()) for p in (folder / "metrics").glob("K4-N1-ddim-teacher-forced-s0-*.json")]
    assert len(row["free_errors"]) == 4 and row["history_reliance"][0] > 0
    assert len(list(folder.glob("grid_*.png"))) == 4
