"""The embedded default: ARD end to end on small embedded datasets on a CPU, and the study of when
the trajectory's history helps.

    python demo.py                     # digits: N=0 against ARD (N=1) under two recipes (~8 min, 2 CPU cores)
    python demo.py --dataset shapes    # the same on 16x16 procedural shapes (slower: a wider teacher)
    python demo.py --study             # the study: recipes, N, target, K=2, 2 seeds (prints its time first)
    python demo.py --study --report    # its tables and plots so far, training nothing

Recipes. "teacher-forced" is the paper's: every stage input is the teacher's trajectory point.
"ema-fed" is ours: from a linear ramp over the first half of training up to probability 0.5, a
step feeds the student's own free-running outputs, rolled out with its EMA weights, as the inputs
after x_T (train.py --student-fed --student-fed-ema), so it is trained on the errors it makes when
it generates. "student-fed" (study only) rolls out with the online weights instead.

Every stage is one of the project's own scripts, run with the command line printed before it:
a tiny DiT teacher in pixel space (shipped in assets/, or trained with --teacher train), 25-step
DDIM trajectories with CFG, K-step students (train.py), samples (sample_ddp.py, sample.py) and the
evaluator in the features of a small classifier of the dataset in place of Inception. Finished
runs are reused when the demo runs again into the same --out, so an interrupted study resumes.
"""
import argparse
import functools
import glob
import json
import os
import shlex
import time
from dataclasses import dataclass

import matplotlib
import numpy as np
import torch

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

import extract_trajectories  # noqa: E402
import sample  # noqa: E402
import sample_ddp  # noqa: E402
import train  # noqa: E402
from ard import gflops, load_student  # noqa: E402
from evaluations.evaluator import evaluate  # noqa: E402
from evaluations.small import reference_images  # noqa: E402
from extract_trajectories import TrajectoryDataset  # noqa: E402
from utils import index_noise_and_labels, save_json, save_npz  # noqa: E402

ROOT = os.path.dirname(os.path.abspath(__file__))
TEACHER_STEPS = 25
CFG_SCALE = 1.5
STUDENT_FED_PROB = 0.5
# How each student's stage inputs are chosen: the paper's teacher forcing, or --student-fed from a ramp
# over the first half of training up to STUDENT_FED_PROB, rolling out with the online or the EMA weights.
RECIPE_FLAGS = {"teacher-forced": [], "student-fed": ["--student-fed", STUDENT_FED_PROB],
                "ema-fed": ["--student-fed", STUDENT_FED_PROB, "--student-fed-ema"]}
RECIPES = tuple(RECIPE_FLAGS)
DEMO_RECIPES = ("teacher-forced", "ema-fed")  # ema-fed beat student-fed on the digits (both N, 2 seeds)


def small_dit(width):
    return ["--vae", "none", "--depth", 4, "--hidden-size", width, "--num-heads", 4, "--global-batch-size", 128,
            "--lr", "1e-3", "--ema-decay", 0.999, "--log-every", 500, "--num-workers", 0]


# The shipped teachers: `python demo.py --dataset D --teacher train` runs exactly this, then exports it (float16).
TEACHER_FLAGS = {
    "digits": ["--data-path", "digits", "--image-size", 8, "--model", "DiT-S/2", "--iterations", 4000, *small_dit(64)],
    "shapes": ["--data-path", "shapes", "--image-size", 16, "--model", "DiT-S/4", "--iterations", 6000,
               "--ckpt-every", 2000, "--sample-every", 2000, *small_dit(128)],
}
# 1000 steps of batch 64, samples and metrics, on two CPU cores: the demo's four digits students took 8.3 min
# from a fresh clone; the shapes cost about 2.5x the digits.
MINUTES_PER_STUDENT = {"digits": 2.0, "shapes": 5.0}
# To keep the study near two hours on two cores (about 2.5 by the estimate above), the shapes run only the
# first 8 students of study_grid (the demo's four, online rollouts, the x0 target).
STUDY_SIZE = {"shapes": 8}


@dataclass(frozen=True)
class Student:
    K: int
    N: int
    target: str
    recipe: str

    @property
    def key(self):
        return f"K{self.K}-N{self.N}-{self.target}-{self.recipe}"

    def label(self):
        name = "step distillation (N=0)" if self.N == 0 else f"ARD (N={self.N})"
        return name + ("" if self.target == "state" else ", x0 target")


def paper_history_layers(depth):
    """The paper's best N=6 of 28 blocks, in proportion (at least 1)."""
    return max(1, round(depth * 6 / 28))


def demo_grid(depth, K=4):
    """Step distillation and ARD at the paper's N under the demo's two recipes: four students, ~8 minutes."""
    return [Student(K, n, "state", recipe) for recipe in DEMO_RECIPES for n in (0, paper_history_layers(depth))]


def study_grid(depth):
    """The study's students in the order they run: the demo's four, the same two fed with online
    rollouts, then the axes (the x0 target, N up to depth, K=2) under the demo's recipes, all
    teacher-forced first."""
    ard_n = paper_history_layers(depth)
    axes = ([Student(4, n, "x0", r) for r in DEMO_RECIPES for n in (0, ard_n)]
            + [Student(4, n, "state", r) for r in DEMO_RECIPES for n in sorted({1, depth // 2, depth} - {ard_n})]
            + [Student(2, n, "state", r) for r in DEMO_RECIPES for n in (0, ard_n)])
    online_fed = [Student(4, n, "state", "student-fed") for n in (0, ard_n)]
    return demo_grid(depth) + online_fed + sorted(axes, key=lambda s: RECIPES.index(s.recipe))


def students_of(dataset, depth, study):
    return study_grid(depth)[:STUDY_SIZE.get(dataset)] if study else demo_grid(depth)


def run(script, main, argv):
    """Runs a script's main() in this process, after printing the command line it stands for."""
    argv = [str(a) for a in argv]
    print("\n$ python " + " ".join([script, *map(shlex.quote, argv)]), flush=True)
    return main(argv)


def train_once(results_dir, stage, name, flags, may_train=True):
    """The final checkpoint of train.py run with `flags`, reusing a finished earlier run (which must
    exist unless `may_train`)."""
    for experiment in sorted(glob.glob(os.path.join(results_dir, f"*-{stage}-{name}"))):
        if os.path.exists(os.path.join(experiment, "done")):
            return sorted(glob.glob(os.path.join(experiment, "checkpoints", "*.pt")))[-1]
    if not may_train:
        raise FileNotFoundError(f"no finished {stage} run {name!r} in {results_dir} (--report trains nothing)")
    experiment = run("train.py", train.main, ["--stage", stage, *flags, "--results-dir", results_dir, "--name", name])
    open(os.path.join(experiment, "done"), "w").close()
    return sorted(glob.glob(os.path.join(experiment, "checkpoints", "*.pt")))[-1]


def trained_teacher(dataset, out, may_train=True):
    """Trains the dataset's teacher (or, unless `may_train`, finds it trained) and exports it as assets/ holds it."""
    ckpt = train_once(os.path.join(out, "runs"), "teacher", dataset, TEACHER_FLAGS[dataset], may_train)
    exported = os.path.join(out, f"{dataset}_teacher.safetensors")
    run("train.py", train.main, ["--export", ckpt, exported, "--export-half"])
    return exported


def cached(path, compute):
    """compute() -> a JSON-able result, stored at `path` and read from there on later runs."""
    if os.path.exists(path):
        with open(path) as f:
            return json.load(f)
    result = compute()
    save_json(result, path)
    return result


class Experiment:
    """One dataset's teacher, trajectories, students and metrics, all under `out`."""

    def __init__(self, dataset, teacher, out, args):
        self.dataset, self.teacher, self.out, self.args = dataset, teacher, out, args
        self.config = sample.load_generator(teacher)[2]["dit"]
        self.depth = self.config["depth"]
        os.makedirs(os.path.join(out, "metrics"), exist_ok=True)
        self.reference = os.path.join(out, "reference.npz")
        if not os.path.exists(self.reference):
            images, labels = reference_images(dataset)
            save_npz(self.reference, dict(arr_0=images, arr_1=labels))

    @functools.cache
    def trajectories(self, K, held_out=False):
        """The trajectory directory for K-step students, extracted (or checked) once per experiment."""
        name, count, seed = ("held_out", self.args.num_held_out, 1) if held_out else \
            ("trajectories", self.args.num_trajectories, 0)
        path = os.path.join(self.out, f"{name}_K{K}")
        run("extract_trajectories.py", extract_trajectories.main, [
            "--ckpt", self.teacher, "--out", path, "--num-samples", count, "--shard-size", min(count, 1024),
            "--batch-size", 512, "--num-steps", K, "--teacher-steps", TEACHER_STEPS, "--cfg-scale", CFG_SCALE,
            "--seed", seed])
        return path

    def train_student(self, student, seed):
        fed = RECIPE_FLAGS[student.recipe]
        fed = [*fed, "--student-fed-ramp", self.args.iterations // 2] if fed else []
        return train_once(os.path.join(self.out, "runs"), "ard", f"{student.key}-s{seed}", [
            "--data-path", self.trajectories(student.K), "--teacher", self.teacher, "--num-steps", student.K,
            "--history-layers", student.N, "--target", student.target, *fed, "--global-seed", seed,
            "--global-batch-size", self.args.batch_size, "--iterations", self.args.iterations, "--lr", "1e-3",
            "--ema-decay", 0.995, "--log-every", 250, "--ckpt-every", self.args.iterations,
            "--sample-every", self.args.iterations, "--num-workers", 0])

    def metrics(self, key, ckpt, steps, flags):
        """FID, precision, recall and ms/img of one generator; a grid PNG beside them."""
        npz = os.path.join(self.out, f"samples_{key}.npz")
        if not os.path.exists(npz):
            run("sample_ddp.py", sample_ddp.main, ["--ckpt", ckpt, "--out", npz, "--num-fid-samples",
                                                   self.args.num_images, "--per-proc-batch-size", 500, *flags])
        result = evaluate(self.reference, npz, features=self.dataset,
                          classifier=os.path.join(self.out, "classifier.pt"), progress=False)
        run("sample.py", sample.main, ["--ckpt", ckpt, "--out", os.path.join(self.out, f"grid_{key}.png"),
                                       "--class-labels", *list(range(10)) * 4, "--nrow", 10, *flags])
        return dict(fid=result["fid"], precision=result["precision"], recall=result["recall"],
                    ms_per_image=ms_per_image(ckpt, steps, min(200, self.args.num_images)))

    def teacher_row(self, steps):
        flags = ["--sampler", "ddim", "--cfg-scale", CFG_SCALE, "--num-sampling-steps", steps]
        return cached(os.path.join(self.out, "metrics", f"teacher_ddim{steps}.json"),
                      lambda: self.metrics(f"teacher_ddim{steps}", self.teacher, steps, flags))

    def student_row(self, student, seed, may_train=True):
        """The student's metrics, trained and measured if need be (or None if not `may_train`)."""
        path = os.path.join(self.out, "metrics", f"{student.key}-s{seed}.json")
        if not may_train and not os.path.exists(path):
            return None

        def compute():
            ckpt = self.train_student(student, seed)
            free, forced, reliance = stage_errors(ckpt, self.trajectories(student.K, held_out=True))
            return dict(self.metrics(f"{student.key}-s{seed}", ckpt, student.K, []), free_errors=free,
                        forced_errors=forced, history_reliance=reliance)
        return cached(path, compute)

    def mflops(self, steps, history_layers=0, guided=False):
        return 1e3 * gflops(self.config, steps, history_layers) * (2 if guided else 1)  # CFG: two forwards a step


def ms_per_image(ckpt, steps, count, repeats=3):
    """Wall time per image of generating `count` images in one batch (best of 3)."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    generate, network, info = sample.load_generator(ckpt, sampler="ddim", steps=steps, cfg_scale=CFG_SCALE)
    network.to(device)
    shape = (info["dit"]["in_channels"], info["dit"]["input_size"], info["dit"]["input_size"])
    noise, y = (t.to(device) for t in index_noise_and_labels(2, range(count), shape, info["dit"]["num_classes"]))
    times = []
    with torch.no_grad():
        for _ in range(repeats):
            start = time.perf_counter()
            generate(noise, y)
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
    return 1000 * min(times) / count


def stage_errors(ckpt, held_out):
    """Per-stage MSE against the teacher's trajectory points, generating freely (each stage fed the
    student's own outputs) and teacher-forced (each stage fed the teacher's points), and how far each
    stage's output moves when its history is swapped for another sample's (history_reliance)."""
    student, args = load_student(ckpt)
    data = TrajectoryDataset(held_out, args["target"])
    stages, targets, y = (torch.stack(t) for t in zip(*[data[i] for i in range(len(data))]))
    with torch.no_grad():
        free, forced = student.sample(stages[:, 0], y), student(stages, y)
        reliance = history_reliance(student, stages, y, forced)
    free_errors, forced_errors = (((p - targets) ** 2).mean(dim=(0, 2, 3, 4)).tolist() for p in (free, forced))
    return free_errors, forced_errors, reliance


def history_reliance(student, stages, y, forced):
    """For stages k >= 1: the mean squared change of stage k's teacher-forced output when the inputs
    of stages < k are taken from another trajectory (the batch rolled by one). Exactly 0 with N=0."""
    changes = []
    for k in range(1, stages.shape[1]):
        swapped = torch.cat([stages.roll(1, dims=0)[:, :k], stages[:, k:]], dim=1)
        changes.append(((student(swapped, y)[:, k] - forced[:, k]) ** 2).mean().item())
    return changes


# ---------------------------------------------------------------------------- aggregation over seeds

def mean_spread(values, digits=2):
    """'mean ± half-range' over seeds (the half-range is the spread; one seed has none)."""
    values = np.asarray(values, dtype=float)
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{values.mean():.{digits}f} ± {(values.max() - values.min()) / 2:.{digits}f}"


def diagnostics(row):
    """exposure_bias: the last step's error generating freely over its teacher-forced error.
    history_reliance: the change of a stage's output when its history is swapped, over that stage's
    teacher-forced error, averaged over stages 1..K-1 (0: the history is ignored)."""
    forced = row["forced_errors"]
    return dict(exposure_bias=row["free_errors"][-1] / forced[-1],
                history_reliance=float(np.mean([c / e for c, e in zip(row["history_reliance"], forced[1:])])))


def gap_ratios(rows, teacher_fid, ard, baseline):
    """ARD's FID gap to the teacher over step distillation's, per seed that has both."""
    seeds = sorted(set(rows.get(ard, {})) & set(rows.get(baseline, {})))
    return [(rows[ard][s]["fid"] - teacher_fid) / (rows[baseline][s]["fid"] - teacher_fid) for s in seeds]


def report(experiment, students, seeds, rows):
    """The results table (mean ± spread over seeds) and the gap-ratio lines, as markdown."""
    teacher = {steps: experiment.teacher_row(steps) for steps in [TEACHER_STEPS, *sorted({s.K for s in students})]}
    teacher_fid = teacher[TEACHER_STEPS]["fid"]
    header = ["model", "recipe", "K", "FID", "precision", "recall", "exposure bias", "history reliance",
              "MFLOPs/img", "ms/img"]
    table = [[f"teacher, DDIM {steps}", "-", steps, f"{m['fid']:.2f}", f"{m['precision']:.3f}",
              f"{m['recall']:.3f}", "-", "-", f"{experiment.mflops(steps, guided=True):.2f}",
              f"{m['ms_per_image']:.3f}"] for steps, m in teacher.items()]
    for student in students:
        done = [dict(r, **diagnostics(r)) for _, r in sorted(rows.get(student, {}).items())]
        if not done:
            continue
        metric = {name: mean_spread([r[name] for r in done], digits) for name, digits in (
            ("fid", 2), ("precision", 3), ("recall", 3), ("exposure_bias", 2), ("history_reliance", 3),
            ("ms_per_image", 3))}
        table.append([student.label(), student.recipe, student.K, metric["fid"], metric["precision"],
                      metric["recall"], metric["exposure_bias"], metric["history_reliance"],
                      f"{experiment.mflops(student.K, student.N):.2f}", metric["ms_per_image"]])
    lines = [f"{experiment.dataset}: {experiment.args.num_images} samples per model, classifier features; "
             f"teacher {TEACHER_STEPS}-step DDIM, CFG {CFG_SCALE}; students {experiment.args.iterations} steps of "
             f"batch {experiment.args.batch_size} on {experiment.args.num_trajectories} trajectories; "
             f"seeds {', '.join(map(str, seeds))} (mean ± half-range).", "",
             *(f"| {' | '.join(map(str, r))} |" for r in [header, ["---"] * len(header), *table]), ""]
    for student in students:
        baseline = Student(student.K, 0, student.target, student.recipe)
        ratios = gap_ratios(rows, teacher_fid, student, baseline) if student.N else []
        if ratios:
            lines.append(f"- gap ratio, {student.recipe}, K={student.K}, {student.target}, ARD N={student.N} over "
                         f"N=0: {mean_spread(ratios)} (the paper: 0.19 at K=4; the claim: at most 0.5)")
    return "\n".join(lines) + "\n", teacher_fid


def plot_fid_vs_history(experiment, students, rows, teacher_fid, path):
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for recipe in RECIPES:
        points = sorted((s.N, [r["fid"] for r in rows[s].values()]) for s in students
                        if s.recipe == recipe and s.K == 4 and s.target == "state" and rows.get(s))
        if points:
            ns, fids = zip(*points)
            ax.errorbar(ns, [np.mean(f) for f in fids], yerr=[(max(f) - min(f)) / 2 for f in fids], fmt="o-",
                        capsize=3, label=recipe)
    ax.axhline(teacher_fid, color="gray", ls=":", label=f"teacher, DDIM {TEACHER_STEPS}")
    ax.set(xlabel=f"history layers N (of {experiment.depth})", ylabel=f"FID ({experiment.dataset} features)",
           xticks=sorted({s.N for s in students}), title=f"{experiment.dataset}: FID against N, K=4")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=150)
    plt.close(fig)


def plot_exposure_bias(experiment, rows, path):
    """Per-step error fed its own outputs against teacher-forced, N=0 and ARD, one panel per recipe."""
    ard_n = paper_history_layers(experiment.depth)
    recipes = [r for r in RECIPES if rows.get(Student(4, 0, "state", r))]
    if not recipes:
        return
    fig, axes = plt.subplots(1, len(recipes), figsize=(4.5 * len(recipes), 3.5), sharey=True, squeeze=False)
    for ax, recipe in zip(axes[0], recipes):
        for n, color in zip((0, ard_n), ("C0", "C1")):
            done = rows.get(Student(4, n, "state", recipe))
            if not done:
                continue
            free, forced = (np.mean([r[k] for r in done.values()], axis=0) for k in ("free_errors", "forced_errors"))
            steps = range(1, len(free) + 1)
            label = Student(4, n, "state", recipe).label()
            ax.plot(steps, free, "o-", color=color, label=f"{label}, fed its own outputs")
            ax.plot(steps, forced, "x--", color=color, label=f"{label}, teacher-forced")
        ax.set(xlabel="student step", yscale="log", xticks=[1, 2, 3, 4], title=f"trained {recipe}")
        ax.legend(fontsize=6)
    axes[0, 0].set_ylabel("MSE to the teacher's trajectory")
    fig.tight_layout()
    fig.savefig(path, dpi=150)
    plt.close(fig)


def run_dataset(dataset, seeds, args):
    out = os.path.join(args.out, dataset)
    os.makedirs(out, exist_ok=True)
    teacher = trained_teacher(dataset, out, may_train=not args.report) if args.teacher == "train" else \
        args.teacher or os.path.join(ROOT, "assets", f"{dataset}_teacher.safetensors")
    experiment = Experiment(dataset, teacher, out, args)
    students = students_of(dataset, experiment.depth, args.study)
    rows = {}
    for student in students:
        for seed in seeds:
            row = experiment.student_row(student, seed, may_train=not args.report)
            if row is not None:
                rows.setdefault(student, {})[seed] = row
    text, teacher_fid = report(experiment, students, seeds, rows)
    plot_fid_vs_history(experiment, students, rows, teacher_fid, os.path.join(out, "fid_vs_history.png"))
    plot_exposure_bias(experiment, rows, os.path.join(out, "exposure_bias.png"))
    return text


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="demo_out")
    p.add_argument("--dataset", choices=list(TEACHER_FLAGS), default=None,
                   help="one dataset (default: digits; with --study, every dataset)")
    p.add_argument("--teacher", default=None, help="a teacher checkpoint, or 'train' to train one "
                                                    "(default: the shipped one in assets/)")
    p.add_argument("--study", action="store_true", help="the whole study: every dataset and axis, 2 seeds")
    p.add_argument("--seeds", type=int, nargs="+", default=None, help="student seeds (default: 0; study: 0 1)")
    p.add_argument("--report", action="store_true", help="train nothing: tables and plots of the finished runs")
    p.add_argument("--iterations", type=int, default=1000, help="training steps of each student")
    p.add_argument("--batch-size", type=int, default=64, help="students' batch size")
    p.add_argument("--num-trajectories", type=int, default=4096)
    p.add_argument("--num-held-out", type=int, default=512, help="trajectories for the per-step errors")
    p.add_argument("--num-images", type=int, default=2000, help="samples per model for the metrics")
    args = p.parse_args(argv)
    started = time.time()
    seeds = args.seeds or ([0, 1] if args.study else [0])
    datasets = [args.dataset] if args.dataset else (list(TEACHER_FLAGS) if args.study else ["digits"])
    runs = {dataset: len(students_of(dataset, 4, args.study)) * len(seeds) for dataset in datasets}
    minutes = sum(n * MINUTES_PER_STUDENT[d] for d, n in runs.items()) * args.iterations / 1000
    print(f"{sum(runs.values())} students on {', '.join(datasets)}: about {minutes:.0f} minutes on two CPU cores "
          f"(finished runs in {args.out} are reused)", flush=True)
    texts = [run_dataset(dataset, seeds, args) for dataset in datasets]
    with open(os.path.join(args.out, "results.md"), "w") as f:
        f.write("\n".join(texts))
    print("\n" + "\n".join(texts))
    print(f"finished in {(time.time() - started) / 60:.1f} min; in {args.out}/: results.md and, per dataset, "
          "grid_*.png, exposure_bias.png, fid_vs_history.png, metrics/*.json")


if __name__ == "__main__":
    main()
