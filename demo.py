"""The embedded default: ARD end to end on small embedded datasets on a CPU, and the study of when
the trajectory's history helps.

    python demo.py                     # digits: N=0 against ARD (N=1), ddim heads, R then R+D (~9 min, 2 CPU cores)
    python demo.py --dataset shapes    # the same on 16x16 procedural shapes (slower: a wider teacher)
    python demo.py --study             # the study: 3 seeds, both datasets, every axis (prints its time first)
    python demo.py --study --report    # its tables and plots so far, training nothing
    python demo.py --teacher-family flow   # the demo on the shipped flow-matching digits teacher (Heun, euler heads)
    python demo.py --dataset shapes-text   # text-to-image: a PixArt toy on captioned shapes, adherence beside FID

Students. Step distillation (N=0) and ARD (history in the lower N blocks), with the heads read
"direct" (the raw output is the prediction, as in the public re-implementation) or "ddim" (read
as the teacher reads its own output, an ε-prediction mapped through the DDIM step to the next
stage time: at initialisation the teacher's one-jump solve). Recipes: "teacher-forced" is the
paper's; "ema-fed" (study) feeds, from a ramp up to probability 0.5, the student's own rollouts
with its EMA weights as the stage inputs after x_T (train.py --student-fed --student-fed-ema).
Stages, as in the paper's Table 1: R, the regression; R+D (DDPM teachers), N=0 and ARD with ddim heads
fine-tuned adversarially from their R checkpoint (train.py --stage gan: GAN_FLAGS and an adversary of
ADVERSARIES; the demo's is DEMO_ADVERSARY, the study's GAN study all of them).

Evaluation. A seed varies the trajectory noise (extract_trajectories.py --seed), the batch order
(train.py --global-seed) and the evaluation noise (sample_ddp.py --global-seed), which is drawn
from the evaluation stream and never from a trajectory's noise. Every model of a seed, teacher
included, generates from the same evaluation noise, so differences are paired: each comes with a
bootstrap interval over samples of its mean over seeds, and the per-seed values. Beside FID: KID,
precision/recall (the pre-activation features of the dataset's shipped classifier in assets/, named in the
table's header by its sha256, in place of Inception), and fidelity to the 25-step teacher (the mean
per-sample RMS distance to its sample from the same noise, and the FD between the two sample sets).

Every stage is one of the project's own scripts, run with the command line printed before it.
A run, a trajectory set, a sample file or a metric is reused only when every setting that made it
is equal: each is found by a hash of its settings, and the demo says when it reuses one.
"""
import argparse
import functools
import glob
import hashlib
import json
import os
import re
import shlex
import shutil
import time
from dataclasses import dataclass, replace

import matplotlib
import numpy as np
import torch

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

import extract_trajectories  # noqa: E402
import pixart  # noqa: E402
import sample  # noqa: E402
import sample_ddp  # noqa: E402
import train  # noqa: E402
from ard import gflops, load_student, solver_readout  # noqa: E402
from data import CAPTIONED, caption_words, draw_captions  # noqa: E402
from evaluations import adherence  # noqa: E402
from evaluations.evaluator import evaluate, extract_features  # noqa: E402
from evaluations.metrics import (bootstrap_fids, bootstrap_multiplicities, frechet_distance,  # noqa: E402
                                 gaussian_statistics, verdict)
from evaluations.npz import open_images  # noqa: E402
from evaluations.small import (SHAPES_REFERENCE_COUNT, SHAPES_REFERENCE_SEED, load_small_features,  # noqa: E402
                               network_name, reference_images, shipped_classifier)
from extract_trajectories import TrajectoryDataset  # noqa: E402
from utils import atomic_write, index_noise_and_labels, save_json, save_npz, sha256_of  # noqa: E402

ROOT = os.path.dirname(os.path.abspath(__file__))
TEACHER_STEPS = 25
CFG_SCALE = 1.5
STUDENT_FED_PROB = 0.5
# How each student's stage inputs are chosen: the paper's teacher forcing, or --student-fed from a ramp
# over the first half of training up to STUDENT_FED_PROB, rolling out with the EMA weights.
RECIPE_FLAGS = {"teacher-forced": [], "ema-fed": ["--student-fed", STUDENT_FED_PROB, "--student-fed-ema"]}
RECIPES = tuple(RECIPE_FLAGS)
# The optimiser of the regression (R) students, and the recipe of their adversarial fine-tuning (R+D: train.py
# --stage gan from the R student's final checkpoint): the paper's generator lr 1e-4 (an issue probe found the
# regression's 1e-3 destroys a digits student), batch 48, discriminator lr 1e-3, weight scale 10, clean features
# and every block (train.py's defaults), with the regression's EMA, and no adversarial term for the first
# GAN_WARMUP of the stage (the paper: 3,000 of about 20,000 steps).
REGRESSION_FLAGS = ["--lr", "1e-3", "--ema-decay", 0.995]
GAN_FLAGS = ["--lr", "1e-4", "--ema-decay", 0.995]
GAN_BATCH = 48
GAN_WARMUP = 0.2
# The GAN study's adversaries, each one change to the paper's recipe: flags, and the warm-up's fraction of the
# stage. "no adversary" keeps the weight 0 throughout: the regression continued at the stage's lr and batch, the
# control for what the adversarial term itself adds.
ADVERSARIES = {"paper": ([], GAN_WARMUP), "no adversary": ([], 1.0), "uniform noise": (["--gan-noise", "uniform"],
               GAN_WARMUP), "weight scale 1": (["--gan-weight-scale", 1], GAN_WARMUP), "no warm-up": ([], 0.0),
               "lower blocks": (["--disc-blocks", "lower"], GAN_WARMUP),
               "upper blocks": (["--disc-blocks", "upper"], GAN_WARMUP)}
# The adversary of the demo's R+D students: the paper's weight of 10 runs away on the digits (the GAN study).
DEMO_ADVERSARY = "weight scale 1"
# The R+D runs measured along their stage too (FID, KID, fidelity against GAN steps), at every GAN_CHECKPOINTS-th.
TRACED_ADVERSARIES = ("paper", DEMO_ADVERSARY, "no adversary")
GAN_CHECKPOINTS = 4
STUDY_DATASETS = ("digits", "shapes")
BOOTSTRAP_RESAMPLES = 200
# The paper's gap ratios at K=4 (Table 1): R (4.32 - 2.89) / (10.25 - 2.89); R+D (1.84 - 2.89) / (3.84 - 2.89).
PAPER_GAP_RATIOS = {"R": 0.19, "R+D": -1.11}
TRAINING_PROMPT_SEED = 1000  # + the seed: each seed's trajectory prompts (captioned datasets)
# What each teacher family adds to the commands that load its teacher (`family`), how the teacher solves
# (samples: `solve`; trajectories: `extract`), the name of that solve and its network calls for a number of
# steps, and whether train.py --stage gan fine-tunes its students (`adversarial`: its features' times are DDPM's).
# Its students' solver-read heads are ard.solver_readout's (ddim, or euler).
FAMILIES = {
    "ddpm": dict(family=[], solve=["--sampler", "ddim"], extract=[], solver="DDIM", calls=lambda steps: steps,
                 adversarial=True),
    "flow": dict(family=["--teacher-family", "flow"],
                 solve=["--teacher-family", "flow", "--solver", "heun", "--last-step", "euler"],
                 extract=["--teacher-family", "flow", "--solver", "heun", "--last-step", "euler"], solver="Heun",
                 calls=lambda steps: 2 * steps - 1, adversarial=False),  # Heun's last step Euler, as the README's runs
}


def small_dit(width):
    return ["--vae", "none", "--depth", 4, "--hidden-size", width, "--num-heads", 4, "--global-batch-size", 128,
            "--lr", "1e-3", "--ema-decay", 0.999, "--log-every", 500, "--num-workers", 0]


# The shipped teachers: `python demo.py --dataset D --teacher train` runs exactly this, then exports it (float16).
TEACHER_FLAGS = {
    "digits": ["--data-path", "digits", "--image-size", 8, "--model", "DiT-S/2", "--iterations", 4000, *small_dit(64)],
    "shapes": ["--data-path", "shapes", "--image-size", 16, "--model", "DiT-S/4", "--iterations", 6000,
               "--ckpt-every", 2000, "--sample-every", 2000, *small_dit(128)],
    # a pixel-space PixArt transformer; the demo adds --text-encoder (its toy T5, built in DIR/shapes-text)
    "shapes-text": ["--data-path", "shapes-text", "--image-size", 16, "--patch-size", 4, "--iterations", 7500,
                    "--ckpt-every", 2500, "--sample-every", 5000, *small_dit(128)],
}
# 1000 steps of batch 64, samples, metrics and diagnostics of one student on two CPU cores (3.4 min per digits
# student in a fresh clone's demo at the study's budget); the shapes cost about 2.5x the digits per step; the
# shapes-text demo (its PixArt teacher's solves included) took 9.8 min for two 300-step students.
MINUTES_PER_STUDENT = {"digits": 3.4, "shapes": 8.5, "shapes-text": 16.3}
# An adversarial step of the digits student over a regression step (one thread, batch 64, 60 steps each: 2.2-2.4x
# with the adversarial term, 1.7x in its warm-up, where only the discriminator reads the frozen teacher).
GAN_STEP_COST = 2.3
# The budget of each student and its evaluation: the study's, and the demo's, cut to fit ten minutes on two cores
# (gan_iterations: an R+D student's adversarial steps after its R twin's).
# The PixArt toy's students cost 1.3x the shapes' per step, and its demo has no study: fewer steps and trajectories.
BUDGETS = {"study": dict(iterations=1000, num_trajectories=4096, num_images=2000, gan_iterations=500),
           "demo": dict(iterations=500, num_trajectories=2048, num_images=1000, gan_iterations=250),
           "shapes-text": dict(iterations=300, num_trajectories=1024, num_images=1000)}


class Labels:
    """What a class-conditional dataset's teacher (a DiT) is conditioned on: its class labels."""

    cfg_scale = CFG_SCALE
    columns = ()  # its metrics beyond the common ones
    sample_flags = generator_flags = ()
    load_student = staticmethod(load_student)

    def architecture(self, teacher, teacher_flags):
        """The teacher's config and depth."""
        config = generator(teacher, teacher_flags)[2]["dit"]
        return config, config["depth"]

    def trajectory_flags(self, count, seed, held_out):
        return []

    def grid_flags(self):
        return ["--class-labels", *list(range(10)) * 4, "--nrow", 10]

    def inputs(self, info, count, device):
        """Evaluation noise and conditions of the first `count` samples."""
        dit = info["dit"]
        shape = (dit["in_channels"], dit["input_size"], dit["input_size"])
        return (t.to(device) for t in index_noise_and_labels(0, range(count), shape, dit["num_classes"],
                                                              stream="evaluation"))

    def mflops(self, config, steps, history_layers=0, teacher_calls=None):
        """A student's, or with `teacher_calls` the teacher's solve (CFG: two forwards a network call)."""
        if teacher_calls is not None:
            return 2e3 * gflops(config, teacher_calls)
        return 1e3 * gflops(config, steps, history_layers)

    def score(self, npz, path, classifier):
        return {}


class Prompts(Labels):
    """What a captioned dataset's teacher (PixArt) is conditioned on: prompts, read by its T5. Every evaluation
    draws sample i with the prompt of reference render i (`file`), and each seed's trajectories take prompts
    drawn afresh from the training grammar; their adherence is read by the attribute classifier."""

    cfg_scale = pixart.CFG_SCALE
    columns = (("kind", "adherence_kind", 3), ("pattern", "adherence_pattern", 3), ("colour", "adherence_colour", 3),
               ("all named", "adherence_all", 3))
    load_student = staticmethod(pixart.load_student)
    # the grid's columns: one prompt naming every attribute per kind, two naming fewer, one held-out pair's
    GRID = ("a red disc", "a striped blue triangle", "a yellow diamond", "a striped purple ring",
            "a green square", "a striped shape", "a blue shape", "a green disc")

    def __init__(self, out):
        self.out = out
        self.prompts, _, _ = draw_captions(SHAPES_REFERENCE_COUNT, SHAPES_REFERENCE_SEED)
        self.file = self.write(self.prompts, "prompts.txt")
        self.generator_flags = ("--prompts", self.file)
        self.sample_flags = (*self.generator_flags, "--labels", "balanced")

    def write(self, prompts, name):
        """The prompt file `name` (written once: reuse keys on its modification time)."""
        path = os.path.join(self.out, name)
        if not os.path.exists(path):
            def write(tmp):
                with open(tmp, "w") as f:
                    f.write("\n".join(prompts) + "\n")
            atomic_write(path, write)
        return path

    def architecture(self, teacher, teacher_flags):
        """The teacher's config, with the token count of the longest prompt its cost reads, and its depth."""
        config, _ = pixart.check_pixart(teacher)
        encoder = pixart.PromptEncoder(teacher, torch.device("cpu"))
        text_tokens = max(len(e) for e in encoder.encode(sorted(set(self.prompts))))
        return dict(config, text_tokens=text_tokens), config["num_layers"]

    def trajectory_flags(self, count, seed, held_out):
        """Held-out trajectories take the evaluation's prompts; training ones a seed's own draw."""
        if held_out:
            return ["--prompts", self.file]
        prompts, _, _ = draw_captions(count, TRAINING_PROMPT_SEED + seed)
        return ["--prompts", self.write(prompts, f"train_prompts_n{count}_s{seed}.txt")]

    def grid_flags(self):
        return [*[a for p in self.GRID * 4 for a in ("--prompt", p)], "--nrow", len(self.GRID)]

    def inputs(self, info, count, device):
        noise, indices = index_noise_and_labels(0, range(count), info["shape"], len(self.prompts),
                                                stream="evaluation")
        return noise.to(device), [self.prompts[i] for i in indices]

    def mflops(self, config, steps, history_layers=0, teacher_calls=None):
        if teacher_calls is not None:
            return 1e3 * pixart.teacher_gflops(config, teacher_calls, self.cfg_scale, config["text_tokens"])
        return 1e3 * pixart.gflops(config, steps, history_layers, config["text_tokens"])

    def score(self, npz, path, classifier):
        """Adherence of the samples to their prompts, and each sample's correctness (saved beside, for pairs)."""
        with np.load(npz) as f:
            images, indices = f["arr_0"], f["arr_1"]
        named = adherence.named_attributes([self.prompts[i] for i in indices])
        read = adherence.read_attributes(images, load_small_features(classifier, "shapes-text"))
        np.save(path + "-adherence.npy", adherence.correct(read, named).all(axis=1))
        return dict({f"adherence_{k}": v for k, v in adherence.adherence(read, named).items()},
                    adherence=path + "-adherence.npy")


@dataclass(frozen=True)
class Student:
    K: int
    N: int
    parametrization: str
    recipe: str = "teacher-forced"
    mask: str = "M4"
    history: str = "trajectory"
    target: str = "state"
    stage: str = "R"  # the paper's Table 1: R, the regression; R+D, then adversarial fine-tuning
    adversary: str = "paper"  # R+D: its recipe (ADVERSARIES)

    @property
    def key(self):
        extras = ([self.mask] * (self.mask != "M4") + ["zeros"] * (self.history == "zeros")
                  + ["x0"] * (self.target == "x0") + [self.stage] * (self.stage != "R")
                  + [self.adversary.replace(" ", "_")] * (self.adversary != "paper"))
        return "-".join([f"K{self.K}", f"N{self.N}", self.parametrization, self.recipe, *extras])

    def label(self):
        if self.N == 0:
            name = "step distillation (N=0)"
        else:
            details = [f"N={self.N}", *[self.mask] * (self.mask != "M4"), *["zero history"] * (self.history == "zeros")]
            name = f"ARD ({', '.join(details)})" + (", x0 target" if self.target == "x0" else "")
        adversary = f" ({self.adversary})" if self.adversary != "paper" else ""
        return name + (f", {self.stage}{adversary}" if self.stage != "R" else "")

    def flags(self):
        return ["--num-steps", self.K, "--history-layers", self.N, "--parametrization", self.parametrization,
                "--mask", self.mask, "--history-input", self.history, "--target", self.target]

    def comparisons(self, grid):
        """The students of `grid` this one is compared with, fixed before any run: its step-distillation
        baseline (a gap ratio), and the same student without each thing it varies (an R+D student: the paper's
        adversary, and for a traced one its no-adversary control and its R twin)."""
        others = [replace(self, N=0, mask="M4", history="trajectory")] if self.N else []
        changes = [(self.parametrization != "direct", dict(parametrization="direct")),
                   (self.mask != "M4", dict(mask="M4")), (self.history == "zeros", dict(history="trajectory")),
                   (self.recipe != "teacher-forced", dict(recipe="teacher-forced")),
                   (self.adversary not in ("paper", "no adversary"), dict(adversary="paper")),
                   (self.adversary != "no adversary" and self.adversary in TRACED_ADVERSARIES,
                    dict(adversary="no adversary")),
                   (self.stage != "R" and self.adversary in TRACED_ADVERSARIES, dict(stage="R", adversary="paper"))]
        return [s for s in others + [replace(self, **change) for applies, change in changes if applies] if s in grid]


def paper_history_layers(depth):
    """The paper's best N=6 of 28 blocks, in proportion (at least 1)."""
    return max(1, round(depth * 6 / 28))


def regression_grid(depth, heads="ddim"):
    """Step distillation and ARD at the paper's N, with direct heads and heads read through the teacher's
    solver step (`heads`), teacher-forced: four students."""
    return [Student(4, n, p) for p in ("direct", heads) for n in (0, paper_history_layers(depth))]


def demo_grid(depth, heads="ddim", adversarial=True):
    """The paper's Table 1 in small: step distillation and ARD with `heads` after the regression (R) and after
    adversarial fine-tuning (R+D); without `adversarial` (a family without that stage) the four regression
    students, direct heads beside `heads`. (The study has both.)"""
    if not adversarial:
        return regression_grid(depth, heads)
    return [Student(4, n, heads) for n in (0, paper_history_layers(depth))] + adversarial_grid(depth, heads)


def adversarial_grid(depth, heads, adversaries=(DEMO_ADVERSARY,), axes=()):
    """R+D students with `heads`: N=0 and ARD under each of `adversaries`, ARD alone under each of `axes`."""
    ard_n = paper_history_layers(depth)
    return ([Student(4, n, heads, stage="R+D", adversary=a) for a in adversaries for n in (0, ard_n)]
            + [Student(4, ard_n, heads, stage="R+D", adversary=a) for a in axes])


def study_grid(dataset, depth, heads="ddim"):
    """The study's students in the order they run: the four regression students and the zero-history control;
    on the digits also the paper's mask ablation (M2, M3), history in every block, K=2 and the ema-fed recipe.
    Then the GAN study: N=0 and ARD after the paper's adversarial stage and after its control without the
    adversary; on the digits also ARD under each other adversary."""
    ard_n = paper_history_layers(depth)
    core = regression_grid(depth, heads) + [Student(4, ard_n, heads, history="zeros")]
    if dataset == "shapes":  # 2.5x the digits' cost: the central comparisons only
        return core + adversarial_grid(depth, heads, TRACED_ADVERSARIES)
    axes = [a for a in ADVERSARIES if a not in TRACED_ADVERSARIES]
    return (core + [Student(4, ard_n, heads, mask=m) for m in ("M2", "M3")] + [Student(4, depth, heads)]
            + [Student(2, n, heads) for n in (0, ard_n)]
            + [Student(4, n, heads, recipe="ema-fed") for n in (0, ard_n)]
            + adversarial_grid(depth, heads, TRACED_ADVERSARIES, axes))


def students_of(dataset, depth, study, family="ddpm"):
    """The study's or the demo's students of a teacher of `family`; on a captioned dataset (never in the study)
    N=0 and ARD with solver-read heads, the study's default, and no R+D (the GAN stage is class-conditional)."""
    heads = solver_readout(family)
    if dataset in CAPTIONED:
        return [Student(4, n, heads) for n in (0, paper_history_layers(depth))]
    return study_grid(dataset, depth, heads) if study else demo_grid(depth, heads, FAMILIES[family]["adversarial"])


def run(script, main, argv):
    """Runs a script's main() in this process, after printing the command line it stands for."""
    argv = [str(a) for a in argv]
    print("\n$ python " + " ".join([script, *map(shlex.quote, argv)]), flush=True)
    return main(argv)


def settings_hash(argv):
    """A short hash of a command line, each existing file or pipeline folder in it identified by path, size and
    time (sample_ddp.checkpoint_identity); other folders by their path."""
    items = [sample_ddp.checkpoint_identity(a) if os.path.isfile(str(a)) or sample_ddp.folder_weights(a)
             else str(a) for a in argv]
    return hashlib.sha256(json.dumps(items, sort_keys=True).encode()).hexdigest()[:10]


def train_once(results_dir, stage, name, flags, may_train=True):
    """The final checkpoint of train.py run with `flags`: a finished earlier run with the same settings is
    reused (and said so); without one, None unless `may_train`."""
    name = f"{name}-{settings_hash([stage, *flags])}"
    for experiment in sorted(glob.glob(os.path.join(results_dir, f"*-{stage}-{name}"))):
        if os.path.exists(os.path.join(experiment, "done")):
            print(f"reusing {experiment}: a finished {stage} run with the same settings")
            return train.checkpoint_paths(experiment)[-1]
    if not may_train:
        return None
    experiment = run("train.py", train.main, ["--stage", stage, *flags, "--results-dir", results_dir, "--name", name])
    open(os.path.join(experiment, "done"), "w").close()
    return train.checkpoint_paths(experiment)[-1]


def teacher_name(dataset, family):
    """The name of a shipped teacher in assets/: a .safetensors file, or a captioned dataset's pipeline folder."""
    name = dataset.replace("-", "_") + ("_teacher" if family == "ddpm" else f"_{family}_teacher")
    return name if dataset in CAPTIONED else f"{name}.safetensors"


def toy_text_encoder(out):
    """The captioned datasets' text encoder: the toy T5 over the grammar's words, built once in `out`."""
    path = os.path.join(out, "text_encoder")
    if not os.path.exists(path):
        pixart.build_toy_text_encoder(f"{path}.tmp", caption_words())
        os.replace(f"{path}.tmp", path)
    return path


def trained_teacher(dataset, family, out, may_train=True):
    """Trains the dataset's teacher of `family` (or, unless `may_train`, finds it trained) and exports it as
    assets/ holds it."""
    flags = [*TEACHER_FLAGS[dataset], *FAMILIES[family]["family"]]
    if dataset in CAPTIONED:
        flags += ["--text-encoder", toy_text_encoder(out)]
    ckpt = train_once(os.path.join(out, "runs"), "teacher", dataset, flags, may_train)
    if ckpt is None:
        raise FileNotFoundError(f"no finished teacher run {dataset!r} in {out}/runs (--report trains nothing)")
    exported = os.path.join(out, teacher_name(dataset, family))
    shutil.rmtree(exported, ignore_errors=True)  # a pipeline folder is exported into a new folder
    run("train.py", train.main, ["--export", ckpt, exported, "--export-half"])
    return exported


def generator(ckpt, flags):
    """sample.py's generator of `ckpt` under sample.py's `flags` (a teacher's solve; ignored by students)."""
    p = argparse.ArgumentParser()
    sample.add_generator_args(p)
    p.add_argument("--cfg-scale", type=float, default=CFG_SCALE)
    args = p.parse_args(["--ckpt", ckpt, *map(str, flags)])
    sample.check_flow_args(p, args)
    return sample.generator_from_args(args, torch.device("cpu"), text_to_image=bool(args.prompts))


class Experiment:
    """One dataset's teacher, trajectories, students and metrics, all under `out`."""

    def __init__(self, dataset, teacher, out, args):
        self.dataset, self.teacher, self.out, self.args = dataset, teacher, out, args
        self.family, self.heads = FAMILIES[args.teacher_family], solver_readout(args.teacher_family)
        for sub in ("metrics", "samples"):
            os.makedirs(os.path.join(out, sub), exist_ok=True)
        self.conditions = Prompts(out) if dataset in CAPTIONED else Labels()
        self.config, self.depth = self.conditions.architecture(teacher, self.teacher_flags(TEACHER_STEPS))
        self.reference = os.path.join(out, "reference.npz")
        self.classifier = shipped_classifier(dataset)
        load_small_features(self.classifier, dataset)  # a missing network stops here, before any training
        if not os.path.exists(self.reference):
            images, labels = reference_images(dataset)
            save_npz(self.reference, dict(arr_0=images, arr_1=labels))

    @functools.cache
    def trajectories(self, K, seed, held_out=False, extract=True):
        """The directory, named by their settings, of seed `seed`'s trajectories for K-step students (held out:
        from the evaluation noise); with `extract`, extracted there (or checked) first."""
        count = self.args.num_held_out if held_out else self.args.num_trajectories
        flags = ["--ckpt", self.teacher, "--num-samples", count, "--shard-size", min(count, 1024), "--batch-size",
                 512, "--num-steps", K, "--teacher-steps", TEACHER_STEPS, "--cfg-scale", self.conditions.cfg_scale,
                 "--seed", seed, *["--held-out"] * held_out, *self.family["extract"],
                 *self.conditions.trajectory_flags(count, seed, held_out)]
        path = os.path.join(self.out, f"{'held_out' if held_out else 'trajectories'}_K{K}_s{seed}_"
                                      f"{settings_hash(flags)}")
        if extract:
            run("extract_trajectories.py", extract_trajectories.main, [*flags, "--out", path])
        return path

    def train_student(self, student, seed, may_train=True):
        """The student's final checkpoint (None if it is not trained, unless `may_train`)."""
        if student.stage == "R+D":
            return self.fine_tune(student, seed, may_train)
        fed = RECIPE_FLAGS[student.recipe]
        fed = [*fed, "--student-fed-ramp", self.args.iterations // 2] if fed else []
        flags = ["--data-path", self.trajectories(student.K, seed, extract=may_train), "--teacher", self.teacher,
                 *self.family["family"], *student.flags(), *fed,
                 *self.run_flags(seed, self.args.iterations, self.args.batch_size, REGRESSION_FLAGS)]
        return train_once(os.path.join(self.out, "runs"), "ard", f"{student.key}-s{seed}", flags, may_train)

    def fine_tune(self, student, seed, may_train=True):
        """An R+D student: train.py --stage gan from its R twin's final checkpoint (trained first if need be) on
        the same trajectories, against the dataset's real images, for gan_iterations steps (a gan run counts
        its steps from 0, whatever the step of its --init) under its adversary's recipe, in batches of
        gan_batch, logged 20 times (the study's traced adversaries: a checkpoint at every GAN_CHECKPOINTS-th of
        the stage). The student's settings come from the --init."""
        init = self.train_student(replace(student, stage="R", adversary="paper"), seed, may_train)
        if init is None:
            return None
        iterations = self.args.gan_iterations
        adversary, warmup = ADVERSARIES[student.adversary]
        every = iterations // GAN_CHECKPOINTS if self.args.study and student.adversary in TRACED_ADVERSARIES \
            else iterations
        flags = ["--init", init, "--data-path", self.trajectories(student.K, seed, extract=may_train),
                 "--real-data", self.dataset, *GAN_FLAGS, "--gan-warmup", round(warmup * iterations), *adversary,
                 *self.run_flags(seed, iterations, gan_batch(self.args), log_every=max(1, iterations // 20),
                                 ckpt_every=every)]
        return train_once(os.path.join(self.out, "runs"), "gan", f"{student.key}-s{seed}", flags, may_train)

    def run_flags(self, seed, iterations, batch_size, recipe=(), log_every=250, ckpt_every=None):
        """A student run's seed, batch, length and `recipe`; a checkpoint every `ckpt_every` steps (default: at
        its end) and a sample grid at its end."""
        return ["--global-seed", seed, "--global-batch-size", batch_size, "--iterations", iterations, *recipe,
                "--log-every", log_every, "--ckpt-every", ckpt_every or iterations, "--sample-every", iterations,
                "--num-workers", 0]

    def measure(self, name, ckpt, seed, flags, teacher=None, held_out=None, may_compute=True, grid=True):
        """A generator's metrics on seed `seed`'s evaluation noise: FID, KID, precision, recall, ms/img; with
        `teacher` (the 25-step teacher's row of the same seed) fidelity to it; with `held_out` trajectories the
        per-stage errors; with `grid`, its sample grid. Cached under the hash of everything that produced them
        (None if not cached and not `may_compute`); the samples' features are kept beside, for paired comparisons."""
        sample_flags = ["--ckpt", ckpt, "--num-fid-samples", self.args.num_images, "--global-seed", seed, *flags,
                        *self.conditions.sample_flags]
        key = settings_hash([*sample_flags, sha256_of(self.classifier), teacher and teacher["key"], held_out])
        path = os.path.join(self.out, "metrics", f"{name}-s{seed}-{key}")
        if os.path.exists(path + ".json"):
            print(f"reusing {path}.json: metrics with the same settings")
            with open(path + ".json") as f:
                return json.load(f)
        if not may_compute:
            return None
        npz = os.path.join(self.out, "samples", f"{name}-s{seed}-{key}.npz")
        if not os.path.exists(npz):
            run("sample_ddp.py", sample_ddp.main, [*sample_flags, "--out", npz, "--per-proc-batch-size", 500])
        results, features, _ = evaluate(self.reference, npz, features=self.dataset, classifier=self.classifier,
                                        progress=False, return_features=True)
        np.save(path + ".npy", features)
        row = dict(results, key=key, npz=npz, features=path + ".npy",
                   ms_per_image=self.ms_per_image(ckpt, flags, min(200, self.args.num_images)),
                   **self.conditions.score(npz, path, self.classifier))
        if teacher is not None:
            row.update(fidelity(npz, features, teacher))
        if held_out is not None:
            row.update(zip(("free_errors", "forced_errors", "history_reliance"),
                           stage_errors(ckpt, held_out, self.conditions.load_student)))
        if grid:
            run("sample.py", sample.main, ["--ckpt", ckpt, "--out", os.path.join(self.out, f"grid_{name}.png"),
                                           *self.conditions.grid_flags(), *flags])
        save_json(row, path + ".json")
        return row

    def teacher_flags(self, steps):
        return [*self.family["solve"], "--cfg-scale", self.conditions.cfg_scale, "--num-sampling-steps", steps]

    def ms_per_image(self, ckpt, flags, count, repeats=3):
        """Wall time per image of generating `count` images in one batch (best of 3), under sample.py's `flags`."""
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        generate, network, info = generator(ckpt, [*flags, *self.conditions.generator_flags])
        network.to(device)
        noise, conditions = self.conditions.inputs(info, count, device)
        times = []
        with torch.no_grad():
            for _ in range(repeats):
                start = time.perf_counter()
                generate(noise, conditions)
                if device.type == "cuda":
                    torch.cuda.synchronize()
                times.append(time.perf_counter() - start)
        return 1000 * min(times) / count

    def teacher_label(self, steps):
        return f"teacher, {self.family['solver']} {steps}"

    def teacher_row(self, steps, seed, may_compute=True):
        return self.measure(f"teacher_{self.family['solver'].lower()}{steps}", self.teacher, seed,
                            self.teacher_flags(steps), may_compute=may_compute)

    def student_row(self, student, seed, may_train=True):
        """The student's row, trained and measured if need be (or None, unless `may_train`), with its final
        checkpoint; a traced R+D student's also has `trace`, {GAN step: metrics} of its earlier checkpoints."""
        teacher = self.teacher_row(TEACHER_STEPS, seed, may_compute=may_train)
        ckpt = self.train_student(student, seed, may_train)
        if teacher is None or ckpt is None:
            return None
        row = self.measure(student.key, ckpt, seed, [], teacher=teacher,
                           held_out=self.trajectories(student.K, seed, held_out=True, extract=may_train),
                           may_compute=may_train)
        if row is None:
            return None
        earlier = train.checkpoint_paths(os.path.dirname(os.path.dirname(ckpt)))[:-1]
        trace = {train.checkpoint_step(c): self.measure(f"{student.key}-{train.checkpoint_step(c):07d}", c, seed, [],
                                                        teacher=teacher, may_compute=may_train, grid=False)
                 for c in earlier}
        return dict(row, ckpt=ckpt, **({"trace": trace} if trace and None not in trace.values() else {}))

    @functools.cached_property
    def reference_statistics(self):
        """(mu, sigma) of the reference images' features, which every FID here compares against."""
        net = load_small_features(self.classifier, self.dataset)
        features = extract_features(open_images(self.reference), net, 500, torch.device("cpu"), progress=False)
        return gaussian_statistics(features["pool"])

    @functools.cache
    def resampled_fids(self, features, seed):
        """FIDs of the BOOTSTRAP_RESAMPLES resamples of seed `seed`: the draws depend only on the seed and the
        sample count, which every model shares, so the models of one seed stay paired."""
        mu, sigma = self.reference_statistics
        return bootstrap_fids(mu, sigma, {"x": np.load(features)}, resamples=BOOTSTRAP_RESAMPLES, seed=seed)["x"]

    def mflops(self, steps, history_layers=0, teacher=False):
        """A student's, or the teacher's solve."""
        calls = self.family["calls"](steps) if teacher else None
        return self.conditions.mflops(self.config, steps, history_layers, calls)


def fidelity(npz, features, teacher):
    """Distance to the teacher's samples from the same noise: the mean per-sample RMS difference (pixels in
    [-1, 1]) and the Fréchet distance between the two sets' features."""
    mine, theirs = (np.load(path)["arr_0"].astype(np.float64) / 127.5 for path in (npz, teacher["npz"]))
    rms = np.sqrt(((mine - theirs) ** 2).mean(axis=(1, 2, 3))).mean()
    fd = frechet_distance(*gaussian_statistics(features), *gaussian_statistics(np.load(teacher["features"])))
    return dict(rms_to_teacher=float(rms), fd_to_teacher=fd)


def stage_errors(ckpt, held_out, load=load_student):
    """Per-stage MSE against the teacher's held-out trajectory points, generating freely (each stage fed the
    student's own outputs) and teacher-forced (each stage fed the teacher's points), and how far each
    stage's output moves when its history is swapped for another sample's (history_reliance). `load`: the
    student family's loader."""
    student, args = load(ckpt)
    data = TrajectoryDataset(held_out, args["target"], held_out=True)
    stages, targets, *conditions = (torch.stack(t) for t in zip(*[data[i] for i in range(len(data))]))
    with torch.no_grad():
        free, forced = student.sample(stages[:, 0], *conditions), student(stages, *conditions)
        reliance = history_reliance(student, stages, conditions, forced)
    free_errors, forced_errors = (((p - targets) ** 2).mean(dim=(0, 2, 3, 4)).tolist() for p in (free, forced))
    return free_errors, forced_errors, reliance


def history_reliance(student, stages, conditions, forced):
    """For stages k >= 1: the mean squared change of stage k's teacher-forced output when the inputs
    of stages < k are taken from another trajectory (the batch rolled by one). Exactly 0 with N=0."""
    changes = []
    for k in range(1, stages.shape[1]):
        swapped = torch.cat([stages.roll(1, dims=0)[:, :k], stages[:, k:]], dim=1)
        changes.append(((student(swapped, *conditions)[:, k] - forced[:, k]) ** 2).mean().item())
    return changes


# ---------------------------------------------------------------------------- aggregation over seeds

def mean_spread(values, digits=2):
    """'mean ± sd' over seeds (one seed has no spread)."""
    values = np.asarray(values, dtype=float)
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{values.mean():.{digits}f} ± {values.std(ddof=1):.{digits}f}"


def diagnostics(row):
    """exposure_bias: the last step's error generating freely over its teacher-forced error.
    history_reliance: the change of a stage's output when its history is swapped, over that stage's
    teacher-forced error, averaged over stages 1..K-1 (0: the history is ignored)."""
    forced = row["forced_errors"]
    return dict(exposure_bias=row["free_errors"][-1] / forced[-1],
                history_reliance=float(np.mean([c / e for c, e in zip(row["history_reliance"], forced[1:])])))


def gap_ratio(experiment, rows, teachers, student, other):
    """{seed: (FID(student) - FID(teacher)) / (FID(other) - FID(teacher))} and its 95% interval over resamples
    of the mean over seeds, the three sharing their evaluation noise and resampled indices within each seed."""
    per_seed, resampled = {}, []
    for seed in sorted(set(rows[student]) & set(rows[other])):
        trio = (rows[student][seed], rows[other][seed], teachers[seed])
        s, o, t = (row["fid"] for row in trio)
        per_seed[seed] = (s - t) / (o - t)
        s, o, t = (experiment.resampled_fids(row["features"], seed) for row in trio)
        resampled.append((s - t) / (o - t))
    return per_seed, np.percentile(np.mean(resampled, axis=0), [2.5, 97.5])


def paired_adherence(rows, other_rows):
    """{seed: difference} of the all-named-correct rate between two models' {seed: row}, and its 95% interval
    over samples of the mean over seeds, resampled as the FIDs are (the same indices within a seed)."""
    per_seed, resampled = {}, []
    for seed in sorted(set(rows) & set(other_rows)):
        a, b = (np.load(r[seed]["adherence"]).astype(np.float64) for r in (rows, other_rows))
        per_seed[seed] = a.mean() - b.mean()
        resampled.append(bootstrap_multiplicities(len(a), BOOTSTRAP_RESAMPLES, seed) @ (a - b) / len(a))
    return per_seed, np.percentile(np.mean(resampled, axis=0), [2.5, 97.5])


def adherence_clause(rows, other_rows):
    per_seed, interval = paired_adherence(rows, other_rows)
    values = list(per_seed.values())
    return (f"all-named adherence {np.mean(values):+.3f} [{interval[0]:+.3f}, {interval[1]:+.3f}] (seeds "
            f"{', '.join(f'{v:+.3f}' for v in values)}): {verdict(values, interval, 0)}")


def fid_difference(experiment, rows, other_rows):
    """{seed: FID(model) - FID(other)} of two models' {seed: row} and its 95% interval over resamples of the
    mean over seeds, paired."""
    per_seed, resampled = {}, []
    for seed in sorted(set(rows) & set(other_rows)):
        model, other = rows[seed], other_rows[seed]
        per_seed[seed] = model["fid"] - other["fid"]
        resampled.append(experiment.resampled_fids(model["features"], seed)
                         - experiment.resampled_fids(other["features"], seed))
    return per_seed, np.percentile(np.mean(resampled, axis=0), [2.5, 97.5])


def difference_clause(per_seed, interval):
    diffs = list(per_seed.values())
    return (f"FID difference {np.mean(diffs):+.2f} [{interval[0]:+.2f}, {interval[1]:+.2f}] (seeds "
            f"{', '.join(f'{d:+.2f}' for d in diffs)}): {verdict(diffs, interval, 0)}")


def comparison_lines(experiment, students, rows, teachers):
    lines = []
    prompts = bool(experiment.conditions.columns)
    for student in students:
        if prompts and rows.get(student):
            lines.append(f"- {describe(student)} against the {TEACHER_STEPS}-step teacher: "
                         + adherence_clause(rows[student], teachers))
        if student.stage == "R+D" and rows.get(student):
            lines.append(f"- {describe(student)} against the {TEACHER_STEPS}-step teacher: "
                         + difference_clause(*fid_difference(experiment, rows[student], teachers)))
            half = experiment.args.gan_iterations // 2
            if all(half in row.get("trace", {}) for row in rows[student].values()):
                halves = {seed: row["trace"][half] for seed, row in rows[student].items()}
                lines.append(f"- {describe(student)}, the whole stage against its first {half} steps: "
                             + difference_clause(*fid_difference(experiment, rows[student], halves)))
        for other in student.comparisons(students):
            if not rows.get(student) or not rows.get(other):
                continue
            line = f"- {describe(student)} against {describe(other)}: " + difference_clause(
                *fid_difference(experiment, rows[student], rows[other]))
            if other.N == 0 and student.N:
                per_seed, ratio_ci = gap_ratio(experiment, rows, teachers, student, other)
                ratios = list(per_seed.values())
                paper = f" (the paper: {PAPER_GAP_RATIOS[student.stage]:.2f} at K=4)" * (student.adversary == "paper")
                line += (f"; gap ratio {np.mean(ratios):.2f} [{ratio_ci[0]:.2f}, {ratio_ci[1]:.2f}] (seeds "
                         f"{', '.join(f'{r:.2f}' for r in ratios)}): {verdict(ratios, ratio_ci, 1)}{paper}")
            if prompts:
                line += "; " + adherence_clause(rows[student], rows[other])
            lines.append(line)
    return lines


def describe(student):
    return f"{student.label()}, {student.parametrization} heads, {student.recipe}, K={student.K}"


def table_row(name, heads, recipe, steps, done, mflops, columns=()):
    """One markdown row: mean ± sd over seeds of each metric present in the rows `done` (and of `columns`:
    (header, key, digits) after the recall)."""
    def cell(key, digits):
        values = [r[key] for r in done if key in r]
        return mean_spread(values, digits) if values else "-"
    return [name, heads, recipe, steps, cell("fid", 2), cell("kid", 1), cell("precision", 3),
            cell("recall", 3), *[cell(key, digits) for _, key, digits in columns], cell("fd_to_teacher", 2),
            cell("rms_to_teacher", 3), cell("exposure_bias", 2), cell("history_reliance", 3), f"{mflops:.2f}",
            cell("ms_per_image", 3)]


def report(experiment, students, seeds, rows, teachers):
    """The results table (mean ± sd over seeds) and the comparisons with their intervals, as markdown."""
    columns = experiment.conditions.columns
    header = ["model", "heads", "recipe", "K", "FID", "KID", "precision", "recall", *[c[0] for c in columns],
              "FD to teacher", "RMS to teacher", "exposure bias", "history reliance", "MFLOPs/img", "ms/img"]
    table = [table_row(experiment.teacher_label(steps), "-", "-", steps, list(by_seed.values()),
                       experiment.mflops(steps, teacher=True), columns) for steps, by_seed in teachers.items()]
    for student in students:
        done = [dict(r, **diagnostics(r)) for _, r in sorted(rows.get(student, {}).items())]
        if done:
            table.append(table_row(student.label(), student.parametrization, student.recipe, student.K, done,
                                   experiment.mflops(student.K, student.N), columns))
    args = experiment.args
    lines = [f"**{experiment.dataset}**: {args.num_images} samples per model and seed, features of "
             f"{network_name(experiment.classifier, experiment.dataset)}; teacher "
             f"{TEACHER_STEPS}-step {experiment.family['solver']}, CFG {experiment.conditions.cfg_scale}; students "
             f"{args.iterations} steps of batch "
             f"{args.batch_size} on {args.num_trajectories} trajectories{adversarial_budget(args, rows)}; seeds "
             f"{', '.join(map(str, seeds))} "
             f"(mean ± sd over seeds; a seed varies trajectories, batch order and evaluation noise).", "",
             *(f"| {' | '.join(map(str, r))} |" for r in [header, ["---"] * len(header), *table]), "",
             *adherence_bounds(experiment, teachers[TEACHER_STEPS]),
             "Comparisons (decided before the runs; [95% paired bootstrap interval over samples of the mean over "
             "seeds], then each seed's value; 'differs' needs the interval to exclude no change and every seed to "
             "agree in sign):", "",
             *comparison_lines(experiment, students, rows, teachers[TEACHER_STEPS])]
    return "\n".join(lines) + "\n"


def adversarial_budget(args, rows):
    """The R+D students' fine-tuning, where the table has one."""
    if not any(s.stage == "R+D" for s in rows):
        return ""
    recipe = " ".join(map(str, GAN_FLAGS))
    return (f", R+D then {args.gan_iterations} adversarial steps of batch {gan_batch(args)}, the first "
            f"{GAN_WARMUP:.0%} without the adversarial term (train.py --stage gan {recipe}; each row's adversary "
            f"changes it as demo.ADVERSARIES says)")


def adherence_bounds(experiment, teachers):
    """A captioned dataset's adherence ceiling (real renders of the evaluation's prompts) and floor (the
    25-step teacher's samples against the prompts shuffled), from its first seed's samples."""
    if not experiment.conditions.columns or not teachers:
        return []
    with np.load(teachers[min(teachers)]["npz"]) as f:
        images, indices = f["arr_0"], f["arr_1"]
    scores = adherence.score(images, [experiment.conditions.prompts[i] for i in indices],
                             load_small_features(experiment.classifier, experiment.dataset))
    return [f"Adherence ({', '.join(scores['ceiling'])}): ceiling "
            f"{', '.join(f'{v:.3f}' for v in scores['ceiling'].values())} (real renders of the same prompts); floor "
            f"{', '.join(f'{v:.3f}' for v in scores['floor'].values())} (the teacher's samples, prompts shuffled).",
            ""]


def plot_fid_vs_history(experiment, students, rows, path):
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for parametrization in ("direct", experiment.heads):
        points = sorted((s.N, [r["fid"] for r in rows[s].values()]) for s in students if rows.get(s) and s.K == 4
                        and s.parametrization == parametrization and s.recipe == "teacher-forced"
                        and s.mask == "M4" and s.history == "trajectory" and s.stage == "R")
        if points:
            ns, fids = zip(*points)
            ax.errorbar(ns, [np.mean(f) for f in fids], yerr=[np.std(f) for f in fids], fmt="o-", capsize=3,
                        label=f"{parametrization} heads")
    ax.set(xlabel=f"history layers N (of {experiment.depth})", ylabel=f"FID ({experiment.dataset} features)",
           title=f"{experiment.dataset}: FID against N, K=4, teacher-forced")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=150)
    plt.close(fig)


def traced(students, rows):
    """The R+D students whose rows carry their stage's trace, with their R twins."""
    return [(s, replace(s, stage="R", adversary="paper")) for s in students
            if s.stage == "R+D" and rows.get(s) and all("trace" in r for r in rows[s].values())]


def plot_adversarial_stage(experiment, students, rows, teachers, path):
    """FID, KID and FD to the teacher against GAN steps (step 0: the R twin), mean ± sd over seeds, with the
    25-step teacher's FID and KID."""
    pairs = traced(students, rows)
    if not pairs:
        return
    metrics = (("fid", "FID"), ("kid", "KID x 1e6"), ("fd_to_teacher", f"FD to the {TEACHER_STEPS}-step teacher"))
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.5))
    for student, twin in pairs:
        seeds = sorted(set(rows[student]) & set(rows.get(twin, {})))
        stages = [{0: rows[twin][seed], **rows[student][seed]["trace"], experiment.args.gan_iterations:
                   rows[student][seed]} for seed in seeds]
        steps = sorted(stages[0]) if stages else []
        for ax, (key, name) in zip(axes, metrics):
            values = np.array([[stage[step][key] for step in steps] for stage in stages])
            ax.errorbar(steps, values.mean(0), yerr=values.std(0), fmt="o-", capsize=3, label=student.label())
            ax.set(xlabel="GAN steps", ylabel=name, yscale="log")  # a run-away stage sits decades above
    for ax, key in zip(axes, ("fid", "kid")):
        ax.axhline(np.mean([t[key] for t in teachers.values()]), color="k", ls=":",
                   label=f"teacher, {TEACHER_STEPS} steps")
    axes[0].legend(fontsize=6)
    fig.suptitle(f"{experiment.dataset}: the adversarial stage, {len(seeds)} seeds")
    fig.tight_layout()
    fig.savefig(path, dpi=150)
    plt.close(fig)


def training_log(ckpt):
    """{name: (steps, values)} of every logged quantity in the log.txt of the run that wrote `ckpt`."""
    series = {}
    with open(os.path.join(os.path.dirname(os.path.dirname(ckpt)), "log.txt")) as f:
        for line in f:
            if match := re.search(r"\] step (\d+) (.*)", line):
                for name, value in re.findall(r"(\w+)=(\S+)", match.group(2)):
                    series.setdefault(name, ([], []))
                    series[name][0].append(int(match.group(1)))
                    series[name][1].append(float(value))
    return series


def plot_adversarial_training(experiment, students, rows, path):
    """The traced R+D runs' discriminator logits on real and fake tokens, its accuracy and the adaptive
    weight against GAN steps, mean over seeds."""
    pairs = traced(students, rows)
    if not pairs:
        return
    panels = (("d_real", "mean D logit, real"), ("d_fake", "mean D logit, fake"), ("d_acc", "D accuracy"),
              ("gan_weight", "adaptive weight λ"))
    fig, axes = plt.subplots(1, 4, figsize=(16, 3.5))
    for student, _ in pairs:
        logs = [training_log(row["ckpt"]) for row in rows[student].values()]
        for ax, (key, name) in ((ax, panel) for ax, panel in zip(axes, panels) if all(panel[0] in log for log in logs)):
            steps = logs[0][key][0]
            ax.plot(steps, np.mean([log[key][1] for log in logs], axis=0), label=student.label())
            ax.set(xlabel="GAN steps", ylabel=name)
            if key == "gan_weight":  # from 0 in the warm-up to 1e-6 (inert) and past 1 (run-away)
                ax.set_yscale("symlog", linthresh=1e-7)
    axes[0].legend(fontsize=6)
    fig.suptitle(f"{experiment.dataset}: the adversarial stage's training, mean over seeds")
    fig.tight_layout()
    fig.savefig(path, dpi=150)
    plt.close(fig)


def plot_exposure_bias(experiment, rows, path):
    """Per-step error fed its own outputs against teacher-forced, N=0 and ARD, one panel per head reading."""
    ard_n = paper_history_layers(experiment.depth)
    panels = [p for p in ("direct", experiment.heads) if rows.get(Student(4, 0, p))]
    if not panels:
        return
    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 3.5), sharey=True, squeeze=False)
    for ax, parametrization in zip(axes[0], panels):
        for n, color in zip((0, ard_n), ("C0", "C1")):
            student = Student(4, n, parametrization)
            if not rows.get(student):
                continue
            free, forced = (np.mean([r[k] for r in rows[student].values()], axis=0)
                            for k in ("free_errors", "forced_errors"))
            steps = range(1, len(free) + 1)
            ax.plot(steps, free, "o-", color=color, label=f"{student.label()}, fed its own outputs")
            ax.plot(steps, forced, "x--", color=color, label=f"{student.label()}, teacher-forced")
        ax.set(xlabel="student step", yscale="log", xticks=[1, 2, 3, 4], title=f"{parametrization} heads")
        ax.legend(fontsize=6)
    axes[0, 0].set_ylabel("MSE to the teacher's held-out trajectory")
    fig.tight_layout()
    fig.savefig(path, dpi=150)
    plt.close(fig)


def shipped_teacher(dataset, family):
    return os.path.join(ROOT, "assets", teacher_name(dataset, family))


def run_dataset(dataset, seeds, args):
    family = args.teacher_family
    out = os.path.join(args.out, dataset if family == "ddpm" else f"{dataset}-{family}")
    os.makedirs(out, exist_ok=True)
    teacher = trained_teacher(dataset, family, out, may_train=not args.report) if args.teacher == "train" else \
        args.teacher or shipped_teacher(dataset, family)
    experiment = Experiment(dataset, teacher, out, args)
    students = students_of(dataset, experiment.depth, args.study, family)
    rows = {}
    for student in students:
        for seed in seeds:
            row = experiment.student_row(student, seed, may_train=not args.report)
            if row is not None:
                rows.setdefault(student, {})[seed] = row
    teachers = {steps: {seed: row for seed in seeds
                        if (row := experiment.teacher_row(steps, seed, may_compute=not args.report)) is not None}
                for steps in [TEACHER_STEPS, *sorted({s.K for s in students})]}
    text = report(experiment, students, seeds, rows, teachers)
    plot_fid_vs_history(experiment, students, rows, os.path.join(out, "fid_vs_history.png"))
    plot_exposure_bias(experiment, rows, os.path.join(out, "exposure_bias.png"))
    plot_adversarial_stage(experiment, students, rows, teachers[TEACHER_STEPS], os.path.join(out, "gan_stage.png"))
    plot_adversarial_training(experiment, students, rows, os.path.join(out, "gan_training.png"))
    return text


def gan_batch(args):
    """The R+D students' batch: GAN_BATCH, or the regression's if smaller."""
    return min(GAN_BATCH, args.batch_size)


def training_steps(student, args):
    """A student's training in regression steps of the same cost (an R+D student's beyond its R twin's)."""
    if student.stage == "R":
        return args.iterations
    return args.gan_iterations * GAN_STEP_COST * gan_batch(args) / args.batch_size


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="demo_out")
    p.add_argument("--dataset", choices=list(TEACHER_FLAGS), default=None,
                   help="one dataset (default: digits; with --study, digits and shapes)")
    p.add_argument("--teacher", default=None, help="a teacher checkpoint, or 'train' to train one "
                                                    "(default: the shipped one in assets/)")
    p.add_argument("--teacher-family", choices=list(FAMILIES), default="ddpm",
                   help="ddpm: ε-prediction, DDIM; flow: velocity, Heun (digits only ships one; in DIR/digits-flow)")
    p.add_argument("--study", action="store_true", help="the whole study: every dataset and axis, 3 seeds")
    p.add_argument("--seeds", type=int, nargs="+", default=None, help="seeds (default: 0; study: 0 1 2)")
    p.add_argument("--report", action="store_true", help="train nothing: tables and plots of the finished runs")
    p.add_argument("--iterations", type=int, help="training steps of each student (demo 500, study 1000)")
    p.add_argument("--gan-iterations", type=int, help="adversarial steps of each R+D student after its R twin's "
                                                      "(demo 250, study 500)")
    p.add_argument("--batch-size", type=int, default=64, help="students' batch size")
    p.add_argument("--num-trajectories", type=int, help="training trajectories per seed (demo 2048, study 4096)")
    p.add_argument("--num-held-out", type=int, default=512, help="held-out trajectories for the per-step errors")
    p.add_argument("--num-images", type=int, help="samples per model and seed for the metrics (demo 1000, study 2000)")
    args = p.parse_args(argv)
    budget = "study" if args.study else args.dataset if args.dataset in BUDGETS else "demo"
    for name, value in BUDGETS[budget].items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    started = time.time()
    seeds = args.seeds or ([0, 1, 2] if args.study else [0])
    datasets = [args.dataset] if args.dataset else (list(STUDY_DATASETS) if args.study else ["digits"])
    missing = [shipped_teacher(d, args.teacher_family) for d in datasets if args.teacher is None
               and not os.path.exists(shipped_teacher(d, args.teacher_family))]
    if missing:
        p.error(f"no shipped {args.teacher_family} teacher at {', '.join(missing)}: pass --teacher train "
                "(or a checkpoint) or --dataset")
    grids = {dataset: students_of(dataset, 4, args.study, args.teacher_family) for dataset in datasets}
    minutes = len(seeds) * sum(MINUTES_PER_STUDENT[d] * training_steps(s, args) / 1000
                               for d, grid in grids.items() for s in grid)
    print(f"{len(seeds) * sum(map(len, grids.values()))} students on {', '.join(datasets)}: about {minutes:.0f} "
          f"minutes on two CPU cores (finished runs in {args.out} with the same settings are reused)", flush=True)
    texts = [run_dataset(dataset, seeds, args) for dataset in datasets]
    with open(os.path.join(args.out, "results.md"), "w") as f:
        f.write("\n".join(texts))
    print("\n" + "\n".join(texts))
    print(f"finished in {(time.time() - started) / 60:.1f} min; in {args.out}/: results.md and, per dataset, "
          "grid_*.png, exposure_bias.png, fid_vs_history.png, metrics/*.json")


if __name__ == "__main__":
    main()
