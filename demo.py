"""The embedded default: ARD on scikit-learn's handwritten digits, end to end on a CPU.

    python demo.py            # students with N = 0, 1, depth/2, depth: table, grids, plots (~6 min, 2 CPU cores)
    python demo.py --full     # adds the state/x0 comparison (~3 min more)

Every stage is one of the project's own scripts, run with the command line printed before it:
a tiny DiT teacher on 8x8 digits in pixel space (shipped in assets/, or trained with
--teacher train), 25-step DDIM trajectories with CFG, K=4 students (train.py), samples
(sample_ddp.py, sample.py) and the evaluator, with a small digits classifier in place of
Inception. Finished stages are reused when the demo runs again into the same --out.
"""
import argparse
import glob
import json
import os
import shlex
import time

import matplotlib
import torch

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

import extract_trajectories  # noqa: E402
import sample  # noqa: E402
import sample_ddp  # noqa: E402
import train  # noqa: E402
from ard import gflops, load_student  # noqa: E402
from evaluations.digits import digits_uint8  # noqa: E402
from evaluations.evaluator import evaluate  # noqa: E402
from extract_trajectories import TrajectoryDataset  # noqa: E402
from utils import index_noise_and_labels, save_npz  # noqa: E402

ROOT = os.path.dirname(os.path.abspath(__file__))
SHIPPED_TEACHER = os.path.join(ROOT, "assets", "digits_teacher.safetensors")
K = 4
TEACHER_STEPS = 25
CFG_SCALE = 1.5
# The shipped teacher: `python demo.py --teacher train` runs exactly this, then exports it (float16).
TEACHER_FLAGS = ["--data-path", "digits", "--image-size", 8, "--vae", "none", "--model", "DiT-S/2", "--depth", 4,
                 "--hidden-size", 64, "--num-heads", 4, "--global-batch-size", 128, "--iterations", 4000,
                 "--lr", "1e-3", "--ema-decay", 0.999, "--log-every", 500, "--ckpt-every", 4000,
                 "--sample-every", 4000, "--num-workers", 0]


def run(script, main, argv):
    """Runs a script's main() in this process, after printing the command line it stands for."""
    argv = [str(a) for a in argv]
    print("\n$ python " + " ".join([script, *map(shlex.quote, argv)]), flush=True)
    return main(argv)


def train_once(results_dir, stage, name, flags):
    """The final checkpoint of train.py run with `flags`, reusing a finished earlier run."""
    for experiment in sorted(glob.glob(os.path.join(results_dir, f"*-{stage}-{name}"))):
        if os.path.exists(os.path.join(experiment, "done")):
            return sorted(glob.glob(os.path.join(experiment, "checkpoints", "*.pt")))[-1]
    experiment = run("train.py", train.main, ["--stage", stage, *flags, "--results-dir", results_dir, "--name", name])
    open(os.path.join(experiment, "done"), "w").close()
    return sorted(glob.glob(os.path.join(experiment, "checkpoints", "*.pt")))[-1]


def shipped_teacher(out):
    """Trains the demo's teacher and exports it as assets/ holds it."""
    ckpt = train_once(os.path.join(out, "runs"), "teacher", "digits", TEACHER_FLAGS)
    exported = os.path.join(out, "digits_teacher.safetensors")
    run("train.py", train.main, ["--export", ckpt, exported, "--export-half"])
    return exported


def extract(teacher, out, num_samples, seed):
    run("extract_trajectories.py", extract_trajectories.main, [
        "--ckpt", teacher, "--out", out, "--num-samples", num_samples, "--shard-size", min(num_samples, 1024),
        "--batch-size", 512, "--num-steps", K, "--teacher-steps", TEACHER_STEPS, "--cfg-scale", CFG_SCALE,
        "--seed", seed])
    return out


def student_label(n, target):
    return ("step distillation (N=0)" if n == 0 else f"ARD (N={n})") + ("" if target == "state" else ", x0 target")


def ms_per_image(ckpt, steps, count, device, repeats=3):
    """Wall time per image of generating `count` images in one batch (best of 3)."""
    generate, network, _ = sample.load_generator(ckpt, sampler="ddim", steps=steps, cfg_scale=CFG_SCALE)
    network.to(device)
    noise, y = (t.to(device) for t in index_noise_and_labels(2, range(count), (1, 8, 8), 10))
    times = []
    with torch.no_grad():
        for _ in range(repeats):
            start = time.perf_counter()
            generate(noise, y)
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
    return 1000 * min(times) / count


def measure(rows, out, args):
    """Samples, metrics, a grid and the speed of every row; returns the table and the FIDs."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    reference = os.path.join(out, "reference.npz")
    images, labels = digits_uint8()
    save_npz(reference, dict(arr_0=images, arr_1=labels))
    table, fids = [], {}
    for row in rows:
        npz = os.path.join(out, f"samples_{row['key']}.npz")
        if not os.path.exists(npz):
            run("sample_ddp.py", sample_ddp.main, ["--ckpt", row["ckpt"], "--out", npz, "--num-fid-samples",
                                                   args.num_images, "--per-proc-batch-size", 500, *row["flags"]])
        metrics = evaluate(reference, npz, features="digits", classifier=os.path.join(out, "digits_classifier.pt"),
                           progress=False)
        fids[row["label"]] = metrics["fid"]
        speed = ms_per_image(row["ckpt"], row["steps"], min(200, args.num_images), device)
        table.append([row["label"], row["steps"], f"{metrics['fid']:.2f}", f"{metrics['precision']:.3f}",
                      f"{metrics['recall']:.3f}", f"{row['cost'] * 1e3:.2f}", f"{speed:.3f}"])
        run("sample.py", sample.main, ["--ckpt", row["ckpt"], "--out", os.path.join(out, f"grid_{row['key']}.png"),
                                       "--class-labels", *list(range(10)) * 4, "--nrow", 10, *row["flags"]])
    return table, fids


def stage_errors(ckpt, held_out):
    """Per-stage MSE against the teacher's trajectory points, generating freely (each stage fed the
    student's own outputs) and teacher-forced (each stage fed the teacher's points)."""
    student, args = load_student(ckpt)
    data = TrajectoryDataset(held_out, args["target"])
    stages, targets, y = (torch.stack(t) for t in zip(*[data[i] for i in range(len(data))]))
    with torch.no_grad():
        free, forced = student.sample(stages[:, 0], y), student(stages, y)
    return [((p - targets) ** 2).mean(dim=(0, 2, 3, 4)).tolist() for p in (free, forced)]


def plot_exposure_bias(errors, path):
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for (label, (free, forced)), color in zip(errors.items(), plt.rcParams["axes.prop_cycle"].by_key()["color"]):
        steps = range(1, len(free) + 1)
        ax.plot(steps, free, "o-", color=color, label=f"{label}, fed its own outputs")
        ax.plot(steps, forced, "x--", color=color, label=f"{label}, teacher-forced")
    ax.set(xlabel="student step", ylabel="MSE to the teacher's trajectory", yscale="log", xticks=list(steps),
           title="Exposure bias: the error of each step")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=150)
    plt.close(fig)


def plot_fid_vs_history(points, teacher_fid, depth, path):
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for target, values in points.items():
        ns = sorted(values)
        ax.plot(ns, [values[n] for n in ns], "o-", label=f"student, target {target}")
    ax.axhline(teacher_fid, color="gray", ls=":", label=f"teacher, DDIM {TEACHER_STEPS}")
    ax.set(xlabel=f"history layers N (of {depth})", ylabel="FID (digits features)", xticks=sorted(
        {n for values in points.values() for n in values}), title=f"FID against N, K={K}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=150)
    plt.close(fig)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="demo_out")
    p.add_argument("--teacher", default=SHIPPED_TEACHER, help="a teacher checkpoint, or 'train' to train one")
    p.add_argument("--full", action="store_true", help="also the state/x0 comparison")
    p.add_argument("--iterations", type=int, default=1000, help="training steps of each student")
    p.add_argument("--batch-size", type=int, default=64, help="students' batch size")
    p.add_argument("--num-trajectories", type=int, default=4096)
    p.add_argument("--num-held-out", type=int, default=512, help="trajectories for the per-step errors")
    p.add_argument("--num-images", type=int, default=2000, help="samples per model for the metrics")
    args = p.parse_args(argv)
    started, out = time.time(), args.out
    if args.full:
        print("--full: two more students with the x0 target, about 3 more minutes on two CPU cores")
    os.makedirs(out, exist_ok=True)

    teacher = shipped_teacher(out) if args.teacher == "train" else args.teacher
    config = sample.load_generator(teacher)[2]["dit"]
    depth = config["depth"]
    trajectories = extract(teacher, os.path.join(out, "trajectories"), args.num_trajectories, seed=0)
    held_out = extract(teacher, os.path.join(out, "held_out"), args.num_held_out, seed=1)

    ard_n = max(1, round(depth * 6 / 28))  # the paper's best N=6 of 28 blocks, in proportion
    students = [(n, "state") for n in sorted({0, 1, ard_n, depth // 2, depth})]
    if args.full:
        students += [(0, "x0"), (ard_n, "x0")]
    flags = ["--data-path", trajectories, "--teacher", teacher, "--num-steps", K,
             "--global-batch-size", args.batch_size, "--iterations", args.iterations, "--lr", "1e-3",
             "--ema-decay", 0.995, "--log-every", 250, "--ckpt-every", args.iterations,
             "--sample-every", args.iterations, "--num-workers", 0]
    checkpoints = {(n, target): train_once(os.path.join(out, "runs"), "ard", f"N{n}-{target}",
                                           [*flags, "--history-layers", n, "--target", target])
                   for n, target in students}

    teacher_flags = ["--sampler", "ddim", "--cfg-scale", CFG_SCALE, "--num-sampling-steps"]
    rows = [dict(key=f"teacher_ddim{s}", label=f"teacher, DDIM {s}", ckpt=teacher, steps=s, flags=[*teacher_flags, s],
                 cost=s * 2 * gflops(config)) for s in (TEACHER_STEPS, K)]  # CFG: two forwards a step
    rows += [dict(key=f"N{n}_{target}", label=student_label(n, target), ckpt=ckpt, steps=K, flags=[],
                  cost=gflops(config, K, n)) for (n, target), ckpt in checkpoints.items()]
    table, fids = measure(rows, out, args)

    errors = {student_label(n, t): stage_errors(ckpt, held_out) for (n, t), ckpt in checkpoints.items()}
    plot_exposure_bias({k: v for k, v in errors.items() if "x0" not in k}, os.path.join(out, "exposure_bias.png"))
    teacher_fid = fids[f"teacher, DDIM {TEACHER_STEPS}"]
    points = {}
    for n, target in checkpoints:
        points.setdefault(target, {})[n] = fids[student_label(n, target)]
    plot_fid_vs_history(points, teacher_fid, depth, os.path.join(out, "fid_vs_history.png"))
    with open(os.path.join(out, "stage_errors.json"), "w") as f:
        json.dump(errors, f, indent=1)

    distill_gap, ard_gap = (fids[student_label(n, "state")] - teacher_fid for n in (0, ard_n))
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "this CPU"
    header = ["model", "steps", "FID", "precision", "recall", "MFLOPs/img", f"ms/img ({device})"]
    report = "\n".join([
        f"Digits, K={K}, {args.num_images} samples per model against the 1,797 digits, features of a digits "
        f"classifier. Teacher: {TEACHER_STEPS}-step DDIM, CFG {CFG_SCALE}; students: {args.iterations} steps "
        f"of batch {args.batch_size} on {args.num_trajectories} trajectories.", "",
        *(f"| {' | '.join(map(str, r))} |" for r in [header, ["---"] * len(header), *table]), "",
        f"FID gap to the teacher: step distillation {distill_gap:.2f}, ARD (N={ard_n}) {ard_gap:.2f} "
        f"(ARD's gap / step distillation's: {ard_gap / distill_gap:.2f}; the paper's claim: at most 0.5).", ""])
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write(report)
    print("\n" + report)
    print(f"demo finished in {(time.time() - started) / 60:.1f} min; in {out}/: results.md, grid_*.png, "
          "exposure_bias.png, fid_vs_history.png, stage_errors.json")


if __name__ == "__main__":
    main()
