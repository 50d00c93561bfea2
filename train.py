"""Training with DDP: ARD distillation, adversarial fine-tuning, or a DiT teacher from scratch.

    torchrun --nproc_per_node=8 train.py --stage ard --teacher DiT-XL-2-256x256.pt --data-path trajectories/imagenet256
    torchrun --nproc_per_node=8 train.py --stage gan --init results/000-ard/checkpoints/0300000.pt \\
        --data-path trajectories/imagenet256 --real-data /data/imagenet/train --global-batch-size 48
    torchrun --nproc_per_node=8 train.py --stage teacher --data-path /data/imagenet/train --model DiT-XL/2
    torchrun --nproc_per_node=8 train.py --resume results/000-ard-N6-1a2b3c4d   # continue where it stopped
    torchrun --nproc_per_node=8 train.py --stage ard --teacher PixArt-alpha/PixArt-Sigma-XL-2-512-MS \
        --data-path trajectories/pixart512                                   # text-to-image (pixart.py)

Every step is a pure function of (checkpoint, seed, step): batches come from a per-epoch
permutation and the RNG is reseeded per step and rank, so a resumed run is bit-identical to
an uninterrupted one.

Restart = resume: a run's directory is results/NNN-<stage>-<--name>, or without --name
results/NNN-<stage>-<N6 or the model>-<hash of its settings>, so re-running the same command (what
`torchrun --max-restarts` and a requeued job do) continues the run from its newest checkpoint, with
any run-control flag changed (more --iterations, say). A command that names an existing run with
other settings stops at the first that differs. SIGTERM or SIGUSR1 (--stop-signals) stops every rank
after the current step with a checkpoint and exit status 75, for the job script to requeue on.

Student-fed inputs (ard and gan): `--student-fed P` feeds a step, with probability P, the
student's own rollouts as stage inputs instead of the teacher's points: x_T, then the first
K-1 outputs of its KV-cached `sample` from that x_T with the current weights (no gradient);
the targets stay the teacher's. `--student-fed-ema` rolls out with the EMA weights, the ones
that generate at inference, instead. `--student-fed-ramp S` raises P linearly from 0 over the
first S steps. The choice depends on (--global-seed, step) alone, so it is the same on every
rank and after a resume. P = 0 (the default) is the paper's pure teacher forcing; a fed step
costs one sample of K-1 stages more.
"""
import argparse
import concurrent.futures
import copy
import datetime
import glob
import hashlib
import importlib.util
import json
import logging
import math
import os
import shutil
import sys
import time
import uuid

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch._functorch import config as functorch_config
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, Sampler

import pixart
from ard import ARD, check_student_settings, distillation_loss, solver_readout, student_fed_stages
from data import CAPTIONED, DIGITS, EMBEDDED, captioned_dataset, image_dataset, image_format, random_flip
from diffusion import create_diffusion
from extract_trajectories import TrajectoryDataset, condition_key
from gan import DISC_BLOCKS, Discriminator, adaptive_weight, discriminator_hinge_loss, generator_hinge_loss
from models import (checkpoint_error, clips_x0, create_dit, describe_checkpoint, export_ema, latent_geometry,
                    load_autoencoder, load_teacher, read_checkpoint)
from sample import flow_generator, teacher_generator
from transport import CONVENTIONS, flow_matching_loss
from utils import (REQUEUE_EXIT_CODE, StopRequest, add_distributed_args, allow_tf32, autocast, check_meta,
                   cleanup_distributed, fsync_path, init_distributed, on_every_rank, on_rank_zero, progress, save_grid,
                   save_json)

# Flags that may change when a run is resumed; everything else comes from its checkpoint.
RUN_CONTROL = ("iterations", "log_every", "ckpt_every", "sample_every", "num_workers", "compile", "resume",
               "export", "export_half", "dist_timeout", "device", "keep_last", "stop_signals", "divergence_guard",
               "tensorboard", "wandb", "grad_checkpointing", "sample_steps", "sample_cfg_scale")
# Settings that name a file or folder: a run's settings hold them as real paths, so that ./x and /abs/x (or a
# symlink) name the same run.
PATH_SETTINGS = ("data_path", "teacher", "init", "real_data", "vae", "text_encoder")
# A run's settings as its command gave them, in its directory: the same command continues the run.
RUN_SETTINGS = "settings.json"
# Each stage's own defaults: the paper's 300K distillation steps at batch 64; its adversarial stage ran "a
# few hours" on 8 A100s at batch 48 (20K steps); a teacher from scratch as long as DiT's ablations (400K).
STAGE_DEFAULTS = {"ard": dict(iterations=300_000, global_batch_size=64),
                  "gan": dict(iterations=20_000, global_batch_size=48),
                  "teacher": dict(iterations=400_000, global_batch_size=64)}
PARTIAL = ".partial"  # the suffix of a checkpoint folder being written
# Settings that --stage gan takes from its --init checkpoint: the student's and its teacher's.
INIT_FLAGS = ("num_steps", "history_layers", "mask", "target", "shared_head", "parametrization", "history_input",
              "teacher", "model", "image_size", "vae", "teacher_family", "time_convention")


# ---------------------------------------------------------------------------- data order

class StepBatches(Sampler):
    """This rank's indices for steps start, start+1, ...: step s takes the (s mod E)-th slice of
    global_batch indices from the permutation of epoch s // E (E = len // global_batch)."""

    def __init__(self, length, global_batch, rank, world_size, seed, start_step):
        if length < global_batch:
            raise ValueError(f"the dataset has {length} items, fewer than the global batch {global_batch}")
        self.length, self.global_batch, self.seed, self.start_step = length, global_batch, seed, start_step
        self.local = global_batch // world_size
        self.offset = rank * self.local
        self.steps_per_epoch = length // global_batch

    def __iter__(self):
        step, epoch, order = self.start_step, None, None
        while True:
            if step // self.steps_per_epoch != epoch:
                epoch = step // self.steps_per_epoch
                order = torch.randperm(self.length, generator=torch.Generator().manual_seed(self.seed + epoch))
            start = (step % self.steps_per_epoch) * self.global_batch + self.offset
            yield order[start: start + self.local].tolist()
            step += 1


def batches(dataset, args, rank, world_size, start_step, seed_offset=0):
    sampler = StepBatches(len(dataset), args.global_batch_size, rank, world_size, args.global_seed + seed_offset,
                          start_step)
    loader = DataLoader(dataset, batch_sampler=sampler, num_workers=args.num_workers,
                        pin_memory=torch.cuda.is_available(), persistent_workers=args.num_workers > 0)
    return iter(loader)


def seed_step(seed, step, rank):
    torch.manual_seed((seed * 1_000_003 + step) * 4096 + rank)


def student_fed_probability(step, probability, ramp):
    """--student-fed's probability at `step`: linear from 0 over the first `ramp` steps, then `probability`."""
    return probability * min(1.0, step / ramp) if ramp else probability


def feeds_student(seed, step, probability, ramp=0):
    """Whether training step `step` is student-fed: one uniform draw from a generator of its own,
    seeded by (seed, step) alone, so every rank and every resume decides alike."""
    return np.random.default_rng([seed, step]).random() < student_fed_probability(step, probability, ramp)


# ---------------------------------------------------------------------------- tasks

def architecture_overrides(args):
    """The size flags a teacher from scratch was given (--depth, --hidden-size, --num-heads, --patch-size)."""
    return {k: v for k, v in dict(depth=args.depth, hidden_size=args.hidden_size, num_heads=args.num_heads,
                                  patch_size=args.patch_size).items() if v}


class TeacherTask:
    """A DiT trained from scratch, class dropout for CFG: ε-MSE plus the variational term (DDPM), or with
    --teacher-family flow the flow-matching velocity MSE in --time-convention's time (no learned sigma)."""

    init_checkpoint = None

    def __init__(self, args, device, resumed=None):
        self.data, num_classes, channels = image_dataset(args.data_path, args.image_size)
        latent = args.vae != "none"
        latent_channels, downsampling = latent_geometry(args.vae) if latent else (channels, 1)
        overrides = architecture_overrides(args)
        self.flow = args.teacher_family == "flow"
        self.convention = args.time_convention = (args.time_convention or "sit") if self.flow else None
        self.model = create_dit(args.model, args.image_size, latent=latent, downsampling=downsampling,
                                in_channels=latent_channels, num_classes=num_classes,
                                class_dropout_prob=args.class_dropout, learn_sigma=not self.flow, **overrides)
        self.autoencoder = load_autoencoder(args.vae).to(device)
        self.diffusion = create_diffusion("")
        self.flip = flips_images(args, args.data_path)
        self.record = dict(dit=self.model.config, image_size=args.image_size, vae=args.vae,
                           teacher_family=args.teacher_family, time_convention=self.convention)
        self.sample_steps, self.cfg_scale = args.sample_steps, args.sample_cfg_scale
        self.notes = []
        if args.class_dropout == 0 and self.cfg_scale != 1:  # no null class to guide with
            self.cfg_scale = 1.0
            self.notes.append(f"--class-dropout 0: the model has no null class, so its sample grids are drawn "
                              f"without guidance (not --sample-cfg-scale {args.sample_cfg_scale})")

    def loss(self, model, batch, step):
        images, y = batch
        x = encode_images(self.autoencoder, images, self.flip)
        if self.flow:
            return flow_matching_loss(model, x, y, CONVENTIONS[self.convention]).mean(), {}
        t = torch.randint(0, self.diffusion.num_timesteps, (x.shape[0],), device=x.device)
        return self.diffusion.training_losses(model, x, t, dict(y=y))["loss"].mean(), {}

    def generate(self, ema, noise, y):
        if self.flow:
            return flow_generator(ema, self.convention, "euler", self.sample_steps, self.cfg_scale)(noise, y)
        return teacher_generator(ema, "ddim", self.sample_steps, self.cfg_scale,
                                 clip_denoised=clips_x0(self.record["vae"]))(noise, y)

    def grid_inputs(self, seed):
        return label_grid(self.model.config, seed)


class PixArtTeacherTask:
    """A pixel-space PixArt transformer trained from scratch on a captioned dataset (--data-path shapes-text):
    ε-MSE plus the variational term, as the DiT teacher. Every prompt is encoded once by --text-encoder's T5
    into a table held beside the model; a caption is replaced by the negative prompt "" with probability
    --class-dropout, for CFG. --export writes a pipeline folder."""

    init_checkpoint = None

    def __init__(self, args, device, resumed=None):
        if not args.text_encoder:
            raise ValueError(f"--stage teacher on {args.data_path} needs --text-encoder: a folder with tokenizer/ and "
                             "text_encoder/ (pixart.build_toy_text_encoder writes one)")
        if args.teacher_family != "ddpm" or args.vae != "none":
            raise ValueError(f"--stage teacher on {args.data_path} trains a pixel-space DDPM PixArt teacher: pass "
                             "--vae none and no --teacher-family")
        self.data, self.prompts, channels = captioned_dataset(args.data_path, args.image_size)
        embeddings = pixart.PromptEncoder(args.text_encoder, device).encode([*self.prompts, ""])
        self.text, self.text_mask = (t.to(device) for t in pixart.pad_texts(embeddings))
        config = pixart.toy_config(args.image_size, channels, self.text.shape[-1], **architecture_overrides(args))
        from diffusers import PixArtTransformer2DModel
        self.model = PixArtTransformer2DModel(**config)
        self.autoencoder = load_autoencoder("none").to(device)
        self.diffusion = create_diffusion("")
        self.flip = flips_images(args, args.data_path)
        text_encoder = os.path.abspath(args.text_encoder) if os.path.isdir(args.text_encoder) else args.text_encoder
        self.record = dict(family="pixart", pixart=config, vae="none", text_encoder=text_encoder)
        self.dropout, self.sample_steps, self.cfg_scale = args.class_dropout, args.sample_steps, args.sample_cfg_scale
        self.notes = []
        if self.dropout == 0 and self.cfg_scale != 1:  # the negative prompt was never trained
            self.cfg_scale = 1.0
            self.notes.append("--class-dropout 0: the negative prompt is never trained, so the sample grids are drawn "
                              f"without guidance (not --sample-cfg-scale {args.sample_cfg_scale})")

    def texts(self, prompts):
        return self.text[prompts], self.text_mask[prompts]

    def loss(self, model, batch, step):
        images, prompts = batch
        x = encode_images(self.autoencoder, images, self.flip)
        dropped = torch.rand(len(prompts), device=x.device) < self.dropout
        text, mask = self.texts(torch.where(dropped, len(self.prompts), prompts))
        t = torch.randint(0, self.diffusion.num_timesteps, (x.shape[0],), device=x.device)
        model_fn = pixart.guided_teacher(model, 1.0)
        return self.diffusion.training_losses(model_fn, x, t, dict(text=text, text_mask=mask))["loss"].mean(), {}

    def generate(self, ema, noise, prompts):
        run, guided = pixart.teacher_solver(ema, "ddim", self.sample_steps, self.cfg_scale, clip_denoised=True)
        return run(noise, *self.texts(torch.cat([prompts, torch.full_like(prompts, len(self.prompts))])
                                      if guided else prompts))

    def grid_inputs(self, seed):
        """Fixed noise and the first (up to 16) prompts."""
        count, size = min(16, len(self.prompts)), self.model.config.sample_size
        generator = torch.Generator().manual_seed(seed)
        noise = torch.randn(count, self.model.config.in_channels, size, size, generator=generator)
        return noise, (torch.arange(count),)


class DistillationTask:
    """ARD regression on teacher trajectories, teacher-forced (the paper's main stage) or
    student-fed on a share of the steps (--student-fed)."""

    init_checkpoint = None
    notes = ()

    def __init__(self, args, device, resumed=None):
        self.build(args, device, student=resumed["args"] if resumed else None)

    def build(self, args, device, student):
        """Trajectories and student; returns the teacher. The trajectories must come from this
        teacher (its weights, not only its name) and, for a student that exists already
        (`student`: the args of the checkpoint it continues), at its stage times."""
        teacher, teacher_info = load_teacher(args.teacher, args.model, args.image_size, args.vae,
                                             family=args.teacher_family, time_convention=args.time_convention)
        dit = teacher_info["dit"]
        expected = dict(num_steps=args.num_steps, teacher_family=teacher_info["teacher_family"], dit=dit,
                        shape=[dit["in_channels"], dit["input_size"], dit["input_size"]],
                        teacher_weights_sha256=teacher_info["weights_sha256"])
        if teacher_info["time_convention"]:
            expected["time_convention"] = teacher_info["time_convention"]
        if student is not None:
            expected["boundary_times"] = student["stage_times"]
        self.data = TrajectoryDataset(args.data_path, args.target, expected=expected)
        self.model = ARD(teacher, args.num_steps, args.history_layers, args.mask, attention=args.attention,
                         time_convention=teacher_info["time_convention"], **stage_readout(args, self.data.meta))
        self.model.grad_checkpointing = args.grad_checkpointing
        self.autoencoder = load_autoencoder(teacher_info["vae"]).to(device)
        self.record = dict(dit=dit, image_size=teacher_info["image_size"], vae=teacher_info["vae"],
                           teacher_family=teacher_info["teacher_family"], **self.model.settings)
        self.feed_settings(args)
        return teacher

    def feed_settings(self, args):
        self.seed, self.student_fed, self.student_fed_ramp = args.global_seed, args.student_fed, args.student_fed_ramp
        self.rollout_model = self.model  # main() puts the EMA here with --student-fed-ema

    def stage_inputs(self, batch, step):
        """(stages, targets, condition, fed): the batch, its stage inputs replaced by the student's own
        rollout from the same x_T when this step is student-fed (online or EMA weights; the module itself,
        not its DDP or compiled wrapper: the rollout needs no gradient synchronisation)."""
        stages, targets, *condition = batch
        fed = feeds_student(self.seed, step, self.student_fed, self.student_fed_ramp)
        if fed:
            stages = student_fed_stages(self.rollout_model, stages, *condition)
        return stages, targets, condition, fed

    def loss(self, model, batch, step):
        stages, targets, condition, fed = self.stage_inputs(batch, step)
        loss, per_stage = distillation_loss(model(stages, *condition), targets)
        return loss, distillation_logs(per_stage, fed)

    def generate(self, ema, noise, *condition):
        return ema.sample(noise, *condition)[:, -1]

    def grid_inputs(self, seed):
        return label_grid(self.model.dit_config, seed)


class TextToImageTask(DistillationTask):
    """ARD regression of a PixArt student on trajectories extracted from prompts (pixart.py).
    Settings are checked against the trajectories and the teacher's config before its weights load."""

    def build(self, args, device, student):
        if args.attention != "sdpa":
            raise ValueError("--attention flex is for the DiT student; the PixArt student uses sdpa")
        config = pixart.checked_transformer_config(args.teacher)
        check_student_settings(args.num_steps, args.history_layers, config["num_layers"],
                               parametrization=args.parametrization, target=args.target,
                               history_input=args.history_input)
        size = config["sample_size"]
        expected = dict(num_steps=args.num_steps, family="pixart", shape=[config["in_channels"], size, size])
        if student is not None:
            expected["boundary_times"] = student["stage_times"]
        self.data = TrajectoryDataset(args.data_path, args.target, expected=expected)
        teacher, info = pixart.load_pixart(args.teacher, self.data.meta["text_encoder"], self.data.meta["vae"])
        check_meta(self.data.meta, dict(pixart=info["pixart"], teacher_weights_sha256=info["weights_sha256"]),
                   os.path.join(args.data_path, "meta.json"))
        self.model = pixart.PixArtARD(teacher, args.num_steps, args.history_layers, args.mask,
                                      **stage_readout(args, self.data.meta))
        self.model.grad_checkpointing = args.grad_checkpointing
        self.autoencoder = pixart.load_vae(info["vae"]).to(device)
        self.record = dict(family="pixart", pixart=info["pixart"], vae=info["vae"], text_encoder=info["text_encoder"],
                           **self.model.settings)
        self.feed_settings(args)
        return teacher

    def grid_inputs(self, seed):
        """Fixed noise and the first (up to 8) prompts of the trajectories."""
        count = min(8, len(self.data.text) - 1)
        generator = torch.Generator().manual_seed(seed)
        return torch.randn(count, *self.data.meta["shape"], generator=generator), self.data.text.batch(range(count))


class AdversarialTask(DistillationTask):
    """Regression plus a hinge GAN on the frozen teacher's features (the paper's FID 1.84 row)."""

    def __init__(self, args, device, resumed=None):
        """A new run starts from --init (student, EMA, optimiser; from an export, its EMA weights for both and a
        fresh optimiser); a resumed one from its own checkpoint alone, which holds all of that."""
        start = resumed or read_checkpoint(args.init)
        student = start["args"]  # check_init made sure --init is one of our students
        for key in INIT_FLAGS:  # a student from before teacher families has no family: a DDPM teacher's
            setattr(args, key, student.get(key, getattr(args, key)))
        if args.teacher_family != "ddpm":  # its features' times (clean t=0, DDPM re-noising) are DDPM's
            raise ValueError(f"--stage gan fine-tunes students of DDPM teachers; {args.init} distils a "
                             f"{args.teacher_family} teacher")
        teacher = self.build(args, device, student)
        self.init_checkpoint = None if resumed else start
        if "model" not in start:
            self.notes = [f"--init {args.init} is an export: the model and its EMA start from its EMA weights, "
                          f"with a fresh optimiser"]
        self.real, _, _ = image_dataset(args.real_data, args.image_size)
        self.flip = flips_images(args, args.real_data)
        self.discriminator = Discriminator(teacher, blocks=args.disc_blocks).to(device)
        self.disc_opt = torch.optim.AdamW(self.discriminator.heads.parameters(), lr=args.disc_lr, weight_decay=0,
                                          fused=device.type == "cuda")
        self.gan_noise, self.warmup, self.gan_scale = args.gan_noise, args.gan_warmup, args.gan_weight_scale
        self.noiser = create_diffusion("")

    def features_input(self, x):
        """The discriminator's input and time: clean at t=0, or re-noised at a uniform random t."""
        if self.gan_noise == "none":
            return x, torch.zeros(x.shape[0], dtype=torch.long, device=x.device)
        t = torch.randint(0, self.noiser.num_timesteps, (x.shape[0],), device=x.device)
        return self.noiser.q_sample(x, t), t

    def loss(self, model, batch, step):
        # The adaptive weight backpropagates through the student more than once (retain_graph): a
        # compiled student must not donate its saved tensors to the first backward. (The setting
        # is read when the forward is compiled and again by every retained backward.)
        with functorch_config.patch(donated_buffer=False):
            return self.generator_loss(model, batch, step)

    def generator_loss(self, model, batch, step):
        """L_reg + λ·L_G (λ = 0 in the warm-up); logs both terms, λ and, as g_reg_grad and g_adv_grad, the
        two gradient norms on the last head that λ is the ratio of."""
        stages, targets, (y,), fed = self.stage_inputs(batch, step)
        prediction = model(stages, y)
        regression, per_stage = distillation_loss(prediction, targets)
        self.fake, self.fake_labels = prediction[:, -1].detach(), y
        logs = dict(distillation_logs(per_stage, fed), reg=regression.detach())
        if step < self.warmup:  # weight 0: no pass through the frozen teacher for the generator
            return regression, dict(logs, gan_weight=torch.zeros((), device=stages.device))
        self.discriminator.heads.requires_grad_(False)
        adversarial = generator_hinge_loss(self.discriminator(*self.features_input(prediction[:, -1]), y))
        self.discriminator.heads.requires_grad_(True)
        last_layer = self.model.heads[-1].linear.weight  # the module itself, however `model` wraps it
        weight, regression_grad, adversarial_grad = adaptive_weight(regression, adversarial, last_layer,
                                                                    scale=self.gan_scale)
        return regression + weight * adversarial, dict(logs, g_adv=adversarial.detach(), gan_weight=weight,
                                                       g_reg_grad=regression_grad, g_adv_grad=adversarial_grad)

    def discriminator_step(self, discriminator, real_batch, bf16):
        """One D step; logs its hinge loss, its mean logit on real and fake tokens, and its accuracy (the
        fraction of real logits above 0 and fake ones below, over every head and token)."""
        images, real_labels = real_batch
        with torch.no_grad():
            real = encode_images(self.autoencoder, images, self.flip)
        with bf16:
            logits_real = discriminator(*self.features_input(real), real_labels)
            logits_fake = discriminator(*self.features_input(self.fake), self.fake_labels)
            loss = discriminator_hinge_loss(logits_real.float(), logits_fake.float())
        self.disc_opt.zero_grad(set_to_none=True)
        loss.backward()
        self.disc_opt.step()
        logits_real, logits_fake = logits_real.detach().float(), logits_fake.detach().float()
        accuracy = torch.cat([(logits_real > 0).flatten(), (logits_fake < 0).flatten()]).float().mean()
        return dict(d_loss=loss.detach(), d_real=logits_real.mean(), d_fake=logits_fake.mean(), d_acc=accuracy)


TASKS = {"teacher": TeacherTask, "ard": DistillationTask, "gan": AdversarialTask}


def task_class(args):
    """The stage's task; text-to-image when its trajectories come from prompts."""
    meta_path = os.path.join(args.data_path, "meta.json")
    if args.stage == "teacher" and args.data_path in CAPTIONED:
        return PixArtTeacherTask
    if args.stage == "teacher" or not os.path.isfile(meta_path):
        return TASKS[args.stage]
    with open(meta_path) as f:
        if condition_key(json.load(f)) != "prompts":
            return TASKS[args.stage]
    if args.stage == "gan":
        raise ValueError("--stage gan (adversarial fine-tuning) is class-conditional only; "
                         f"{args.data_path} holds text-to-image trajectories")
    return TextToImageTask


# ---------------------------------------------------------------------------- helpers

def stage_readout(args, meta):
    """The student settings that come from the trajectories (stage times, the solver's x0 clipping) and the heads'
    flags."""
    return dict(stage_times=meta["boundary_times"], clip_x0=meta["clip_denoised"], shared_head=args.shared_head,
                parametrization=args.parametrization, target=args.target, history_input=args.history_input)


def flips_images(args, path):
    """--random-flip if given; else on for image folders, off for the digits (a mirrored 2 is no digit)."""
    return args.random_flip if args.random_flip is not None else path != DIGITS


def encode_images(autoencoder, images, flip):
    return autoencoder.encode(random_flip(images) if flip else images)


def distributed(module, device):
    """The module in DDP under torchrun, as it is otherwise. DDP re-sends every buffer from rank 0
    before each forward unless the module declares them `constant_buffers` (the students' and
    teachers'; the discriminator's spectral-norm vectors change with every forward)."""
    if not dist.is_initialized():
        return module
    return DDP(module, device_ids=[device.index] if device.type == "cuda" else None,
               broadcast_buffers=not getattr(module, "constant_buffers", False))


def distillation_logs(per_stage, fed):
    """Each stage's loss and whether the step was student-fed (1) or teacher-forced (0)."""
    logs = {f"stage{k}": v for k, v in enumerate(per_stage)}
    return dict(logs, fed=torch.tensor(float(fed), device=per_stage.device))


def ema_decay(decay, step, rampup):
    """The EMA decay of update number `step` (1: the first): `decay`, or with rampup R > 0 EDM's ramp-up,
    the EMA's half-life at most R times the steps so far, so that a short run (or a new stage) is not
    dominated by its initial weights; `decay` is reached at step half_life / R."""
    if not rampup:
        return decay
    half_life = math.log(0.5) / math.log(decay)
    return 0.5 ** (1 / min(half_life, rampup * step))


@torch.no_grad()
def update_ema(ema, model, decay):
    ema_params = [p for p in ema.parameters()]
    torch._foreach_lerp_(ema_params, [p.detach() for p in model.parameters()], 1 - decay)


def checkpoint_step(path):
    """The step of a checkpoint's name (NNNNNNN, or NNNNNNN.pt for the single files of older runs); None for any
    other name (NNNNNNN.partial: a write in progress or cut short)."""
    name = os.path.basename(path).removesuffix(".pt")
    return int(name) if name.isdigit() else None


def checkpoint_paths(experiment_dir):
    """The run's complete checkpoints, oldest first."""
    paths = glob.glob(os.path.join(experiment_dir, "checkpoints", "[0-9]*"))
    return sorted((p for p in paths if checkpoint_step(p) is not None), key=checkpoint_step)


def resume_point(experiment_dir):
    """(the newest checkpoint of a run that reads, notes naming it, each newer one that does not (cut short by a
    crash of the machine, say) and each write that did not finish); (None, []) for no run."""
    if not experiment_dir:
        return None, []
    notes = [f"skipped {path}: its write did not finish" for path in
             sorted(glob.glob(os.path.join(experiment_dir, "checkpoints", f"[0-9]*{PARTIAL}")))]
    for path in reversed(checkpoint_paths(experiment_dir)):
        try:
            checkpoint = read_checkpoint(path)
        except Exception as e:  # a damaged file fails in the zip reader, the unpickler, ...
            notes.append(f"skipped {path}: it does not read ({type(e).__name__}: {str(e).splitlines()[0]})")
            continue
        return checkpoint, notes + [f"resuming from {path} (step {checkpoint['step']})"]
    return None, notes


def checkpoint_group(timeout_minutes):
    """The process group of checkpoint writes under torchrun (None otherwise): gloo, since a write's collectives run
    on the CPU in a background thread, and apart from training's group, whose collectives they would interleave."""
    return dist.new_group(backend="gloo", timeout=datetime.timedelta(minutes=timeout_minutes)) \
        if dist.is_initialized() else None


def save_checkpoint(path, state, group=None, keep_last=0):
    """Starts writing `state` as the checkpoint folder `path`, every rank its share of the shards (torch's planner
    spreads the tensors that all ranks hold alike over them), and returns once the state is copied to CPU memory,
    with a Future that is done, on every rank, once the checkpoint is complete: its shards go to path.partial, which
    rank 0 renames to `path` once every rank's shards and the metadata are on disk, then deleting all but the newest
    `keep_last` checkpoints (0: keeps all). Called by every rank, with `group` from checkpoint_group (None: the
    default group, only while no other collective runs before the Future is done)."""
    partial, rank = path + PARTIAL, dist.get_rank() if dist.is_initialized() else 0
    if rank == 0:  # a write of this step cut short before; nothing of it may mix into this one
        shutil.rmtree(partial, ignore_errors=True)
    done = concurrent.futures.Future()

    def complete(written):
        try:
            written.result()
            on_rank_zero(rank, lambda: publish_checkpoint(partial, path, keep_last), group)  # complete on every rank
            logging.getLogger("train").info(f"saved {path}")
            done.set_result(path)
        except CheckpointException as e:  # a rank's write failed; the group told every rank
            done.set_exception(checkpoint_error(e, f"checkpoint {path} was not written"))
        except BaseException as e:  # the rename (on every rank), or a write outside a group (one process)
            done.set_exception(e)
    dcp.async_save(state, checkpoint_id=partial, process_group=group, no_dist=not dist.is_initialized()
                   ).add_done_callback(complete)
    return done


def wait_for(writing):
    """Waits for a checkpoint write (save_checkpoint's Future, or None), raising its error."""
    if writing is not None:
        writing.result()


def publish_checkpoint(partial, path, keep_last):
    """Renames a written checkpoint folder to its name, durably, and deletes the checkpoints beyond the newest
    `keep_last` (0: none)."""
    fsync_path(partial)
    if os.path.isdir(path):  # the same step again: its earlier folder did not read, or resume would have passed it
        shutil.rmtree(path)
    os.replace(partial, path)
    fsync_path(os.path.dirname(path))
    step = checkpoint_step(path)  # prunes only up to this step: a later one left by a crash may not read
    kept = [p for p in checkpoint_paths(os.path.dirname(os.path.dirname(path))) if checkpoint_step(p) <= step]
    for old in kept[:-keep_last] if keep_last else ():
        shutil.rmtree(old) if os.path.isdir(old) else os.remove(old)


def create_logger(experiment_dir, rank):
    logger = logging.getLogger("train")
    for handler in logger.handlers:
        handler.close()
    logger.handlers.clear()
    logger.propagate = False
    if rank == 0:
        logger.setLevel(logging.INFO)
        formatter = logging.Formatter("[%(asctime)s] %(message)s", datefmt="%Y-%m-%d %H:%M:%S")
        log_file = logging.FileHandler(os.path.join(experiment_dir, "log.txt"))
        for handler in (logging.StreamHandler(sys.stdout), log_file):
            handler.setFormatter(formatter)
            logger.addHandler(handler)
    else:
        logger.addHandler(logging.NullHandler())
    return logger


def new_experiment_dir(results_dir, name):
    """results_dir/NNN-name with NNN one past the highest existing index; created here."""
    os.makedirs(results_dir, exist_ok=True)
    indices = [int(os.path.basename(d)[:3]) for d in glob.glob(os.path.join(results_dir, "[0-9][0-9][0-9]-*"))]
    path = os.path.join(results_dir, f"{max(indices, default=-1) + 1:03d}-{name}")
    os.makedirs(path)
    return path


def prepare_experiment_dir(args, settings):
    """The run's directory with its checkpoints/ and samples/: the resumed one, this command's own that holds no
    checkpoint yet, or a new one, where `settings` (the command's) are recorded. Checkpoint writes an earlier
    process left unfinished (NNNNNNN.partial, skipped by resume) are removed: a checkpoint's size each."""
    if args.resume:
        path = args.resume
    else:
        name = run_name(args.name, settings)
        path = run_dir(args.results_dir, name) or new_experiment_dir(args.results_dir, name)
        if not os.path.exists(os.path.join(path, RUN_SETTINGS)):
            save_json(settings, os.path.join(path, RUN_SETTINGS))
    for sub in ("checkpoints", "samples"):
        os.makedirs(os.path.join(path, sub), exist_ok=True)
    for unfinished in glob.glob(os.path.join(glob.escape(path), "checkpoints", "*" + PARTIAL)):
        shutil.rmtree(unfinished)
    return path


def mean_over_ranks(values):
    """{name: tensor} -> {name: float} averaged over ranks, in one all-reduce."""
    names = sorted(values)
    stacked = torch.stack([values[n].float() for n in names])
    if dist.is_initialized():
        dist.all_reduce(stacked)
        stacked /= dist.get_world_size()
    return dict(zip(names, stacked.tolist()))


# ---------------------------------------------------------------------------- arguments

def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stage", choices=list(TASKS), default="ard")
    p.add_argument("--data-path", help="trajectory directory (ard, gan); teacher: an image folder, 'digits' or "
                                        "'shapes', or the captioned 'shapes-text' (a PixArt teacher)")
    p.add_argument("--results-dir", default="results")
    p.add_argument("--name", default=None,
                   help="the run's name (its directory results/NNN-<stage>-<name>); default: N<history layers> "
                        "(teacher: the model; gan: none) and a hash of the settings: the same command is the same run")
    p.add_argument("--resume", default=None,
                   help="experiment directory to continue from its newest checkpoint that reads (not needed to "
                        "continue a run with its own command, which does that by itself)")
    p.add_argument("--export", nargs=2, metavar=("CKPT", "OUT"),
                   help="write CKPT's EMA weights and settings to OUT (.safetensors; a PixArt teacher: a pipeline "
                        "folder) and exit")
    p.add_argument("--export-half", action="store_true", help="with --export: store float16")
    add_distributed_args(p)
    run = p.add_argument_group("optimisation")
    run.add_argument("--iterations", type=int, default=None,
                     help="default per stage: ard 300,000 (the paper), gan 20,000 (the paper's 'a few hours'), "
                          "teacher 400,000 (DiT's ablations)")
    run.add_argument("--global-batch-size", type=int, default=None, help="default 64; gan 48 (the paper's)")
    run.add_argument("--lr", type=float, default=1e-4)
    run.add_argument("--weight-decay", type=float, default=0.0)
    run.add_argument("--max-grad-norm", type=float, default=1.0)
    run.add_argument("--ema-decay", type=float, default=0.9999)
    run.add_argument("--ema-rampup", type=float, default=0.05, metavar="R",
                     help="EDM's EMA ramp-up: the EMA's half-life is at most R times the steps so far (--ema-decay "
                          "0.9999 is reached at step 138,626 with 0.05); 0: the constant decay of the paper")
    run.add_argument("--global-seed", type=int, default=0)
    run.add_argument("--num-workers", type=int, default=4)
    run.add_argument("--precision", choices=["bf16", "fp32"], default="bf16", help="autocast on GPU")
    run.add_argument("--compile", action="store_true", help="torch.compile the model")
    run.add_argument("--grad-checkpointing", action="store_true")
    run.add_argument("--log-every", type=int, default=100)
    run.add_argument("--ckpt-every", type=int, default=10_000)
    run.add_argument("--keep-last", type=int, default=0, metavar="K",
                     help="keep the newest K checkpoints, deleting older ones once a newer one is complete (default 0: "
                          "keep all)")
    run.add_argument("--sample-every", type=int, default=10_000)
    run.add_argument("--sample-steps", type=int, default=25, help="DDIM steps of the teacher's sample grids")
    run.add_argument("--tensorboard", action="store_true",
                     help="also write every logged scalar, the learning rate and the throughput as TensorBoard events "
                          "in the run's tensorboard/ (rank 0)")
    run.add_argument("--wandb", nargs="?", const="ard", metavar="PROJECT",
                     help="the same to Weights & Biases (project 'ard' by default; needs the wandb package; "
                          "WANDB_MODE=offline writes to the run's wandb/ for a later `wandb sync`)")
    run.add_argument("--sample-cfg-scale", type=float, default=4.0,
                     help="CFG of the teacher's sample grids (none with --class-dropout 0)")
    arch = p.add_argument_group("teacher (ard: which checkpoint; teacher: which architecture)")
    arch.add_argument("--teacher", default="DiT-XL-2-256x256.pt",
                      help="official name or teacher checkpoint; for text-to-image trajectories the PixArt pipeline "
                           "they were extracted with (hub name or local folder)")
    arch.add_argument("--model", default="DiT-XL/2")
    arch.add_argument("--image-size", type=int, default=256)
    arch.add_argument("--vae", default="ema", help="ema, mse, a local diffusers folder (a VA-VAE converted by "
                                                      "vavae.py), or none (pixel space)")
    arch.add_argument("--teacher-family", choices=["ddpm", "flow"], default="ddpm",
                      help="ddpm: ε-prediction (DiT); flow: velocity (SiT, REPA; transport/); teacher: what to train")
    arch.add_argument("--time-convention", choices=list(CONVENTIONS), default=None,
                      help="a flow teacher's time: sit (data at t=1) or repa (data at t=0); default: the checkpoint's "
                           "own, and sit for a new teacher")
    arch.add_argument("--depth", type=int, help="override the named model's depth (small teachers)")
    arch.add_argument("--hidden-size", type=int)
    arch.add_argument("--num-heads", type=int)
    arch.add_argument("--patch-size", type=int)
    arch.add_argument("--class-dropout", type=float, default=0.1,
                      help="teacher: the share of labels dropped to the null class (captions: to the negative prompt)")
    arch.add_argument("--text-encoder", help="a PixArt teacher on captions: a folder with tokenizer/ and text_encoder/")
    arch.add_argument("--random-flip", action=argparse.BooleanOptionalAction, default=None,
                      help="flip real images (default: on for image folders, off for digits)")
    ard = p.add_argument_group("ARD student")
    ard.add_argument("--num-steps", type=int, default=4)
    ard.add_argument("--history-layers", type=int, default=6)
    ard.add_argument("--mask", choices=["M1", "M2", "M3", "M4"], default="M4")
    ard.add_argument("--target", choices=["state", "x0"], default="state")
    ard.add_argument("--history-input", choices=["trajectory", "zeros"], default="trajectory",
                     help="what the history tokens hold: the trajectory, or (a control) stages computed from zero "
                          "inputs, which keep the extra tokens but carry nothing of the sample")
    ard.add_argument("--shared-head", action="store_true")
    ard.add_argument("--parametrization", choices=["direct", "ddim", "euler"], default=None,
                     help="how a stage head's output reads: the prediction itself (direct, the public "
                          "re-implementation), or an ε-prediction mapped through the teacher's DDIM step from the "
                          "stage's input to the next stage time (ddim: at initialisation the teacher's one-jump solve; "
                          "euler: the same for flow teachers, a velocity through the Euler step). Default: the "
                          "teacher's own step (ddim, or euler for flow teachers), which the digits study chose")
    ard.add_argument("--attention", choices=["sdpa", "flex"], default="sdpa",
                     help="the history blocks: per-stage SDPA, or a FlexAttention block mask (needs --compile)")
    ard.add_argument("--student-fed", type=float, default=0.0, metavar="P",
                     help="probability that a step feeds the stages after x_T the student's own rollout (its "
                          "KV-cached sample, no gradient) instead of the teacher's points; targets stay the "
                          "teacher's (ard and gan; default 0: teacher forcing, the paper's)")
    ard.add_argument("--student-fed-ramp", type=int, default=0, metavar="S",
                     help="raise the --student-fed probability linearly from 0 over the first S steps")
    ard.add_argument("--student-fed-ema", action="store_true",
                     help="roll out with the EMA weights (those that generate at inference), not the online ones")
    gan = p.add_argument_group("adversarial fine-tuning")
    gan.add_argument("--init", help="ARD checkpoint to start from (model, EMA and optimiser), or its export (the EMA "
                                    "weights for both, a fresh optimiser)")
    gan.add_argument("--real-data", help="image folder, 'digits' or 'shapes'")
    gan.add_argument("--disc-lr", type=float, default=1e-3)
    gan.add_argument("--gan-warmup", type=int, default=3000, help="steps with adversarial weight 0")
    gan.add_argument("--gan-weight-scale", type=float, default=10.0)
    gan.add_argument("--no-divergence-guard", dest="divergence_guard", action="store_false",
                     help=f"go on when the regression loss passes {DIVERGENCE_MULTIPLE} times its level at the end "
                          "of the warm-up (by default the run stops there, with its last good checkpoint: in the GAN "
                          "study the paper's x 10 passed it within 25-50 adversarial steps, the stable x 1 never came "
                          "within a tenth of it)")
    gan.add_argument("--gan-noise", choices=["none", "uniform"], default="none",
                     help="re-noise real and fake before the feature network: no (t=0) or at uniform random t")
    gan.add_argument("--disc-blocks", choices=list(DISC_BLOCKS), default="all",
                     help="the teacher blocks whose tokens feed a discriminator head (the paper: all)")
    return p


def parse_args(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    given = build_parser()  # the same flags with a marker as every default: what this command line sets
    unset = object()
    given.set_defaults(**{k: unset for k in vars(args)})
    explicit = {k: v for k, v in vars(given.parse_args(argv)).items() if v is not unset}
    if args.export:
        return args
    if not args.resume and args.stage == "gan":
        from_init = [k for k in INIT_FLAGS if k in explicit]
        if from_init:
            parser.error("--stage gan takes the student's and its teacher's settings from --init; "
                         f"drop --{from_init[0].replace('_', '-')}")
    if not args.resume:
        fill_defaults(args)
        args.resume = continued_run(parser, args)
    if args.resume:
        args = resumed_args(parser, args, {**explicit, "resume": args.resume})
        fill_defaults(args)  # settings added since the run began
    check_args(parser, args)
    return args


def fill_defaults(args):
    """The defaults that depend on other flags (a resumed run has its own, from its checkpoint)."""
    for key, value in STAGE_DEFAULTS[args.stage].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.parametrization is None:
        args.parametrization = solver_readout(args.teacher_family)


# ---------------------------------------------------------------------------- the run's directory

def run_settings(args):
    """The settings that shape a run (its command without the run-control flags and where it is written), local
    paths made real."""
    def real(key, value):
        return os.path.realpath(value) if key in PATH_SETTINGS and value and os.path.exists(value) else value
    return {k: real(k, v) for k, v in sorted(vars(args).items()) if k not in (*RUN_CONTROL, "results_dir", "name")}


def run_name(name, settings):
    """--stage and --name, or without --name the stage's usual name and a hash of the run's settings: the same
    command always names the same run, whatever its run-control flags."""
    if name:
        return f"{settings['stage']}-{name}"
    usual = {"teacher": settings["model"].replace("/", "-") + "-", "ard": f"N{settings['history_layers']}-",
             "gan": ""}[settings["stage"]]  # a gan run's student is --init's
    return f"{settings['stage']}-{usual}{hashlib.sha256(json.dumps(settings).encode()).hexdigest()[:8]}"


def run_dir(results_dir, name):
    """The newest results_dir/NNN-name (None if there is none)."""
    found = sorted(glob.glob(os.path.join(glob.escape(results_dir), f"[0-9][0-9][0-9]-{name}")))
    return found[-1] if found else None


def continued_run(parser, args):
    """The run this command continues (None for a new one): its directory when it has a checkpoint and the same
    settings. A restart (torchrun --max-restarts, a requeued job) re-runs the same command; a command that names
    an existing run with other settings stops at the first that differs."""
    settings = run_settings(args)
    path = run_dir(args.results_dir, run_name(args.name, settings))
    if path is None:
        return None
    settings_path = os.path.join(path, RUN_SETTINGS)
    if not os.path.isfile(settings_path):
        if checkpoint_paths(path):
            parser.error(f"{path} has no {RUN_SETTINGS} (it began before runs recorded their settings): "
                         f"continue it with --resume {path} or choose another --name")
        return None  # stopped (or, on another rank, being made) before its settings were written: a new run
    with open(settings_path) as f:
        saved = json.load(f)
    for key, value in settings.items():
        if saved.get(key) != json.loads(json.dumps(value)):
            parser.error(f"{path} is a run with --{key.replace('_', '-')} {saved.get(key)!r}, not {value!r}: "
                         "re-run its command to continue it, or choose another --name for a new run")
    return path if checkpoint_paths(path) else None


def resumed_args(parser, args, explicit):
    """The run's own settings from its newest readable checkpoint, with only run-control flags changed."""
    checkpoint, notes = resume_point(args.resume)
    if checkpoint is None:
        parser.error(f"--resume {args.resume}: no readable checkpoint in {args.resume}/checkpoints "
                     + " ".join(f"({note})" for note in notes))
    saved = checkpoint["args"]
    changed = [k for k, v in explicit.items() if k not in RUN_CONTROL and saved.get(k) != v]
    if changed:
        parser.error(f"a resumed run keeps its settings; drop --{changed[0].replace('_', '-')}")
    merged = {**vars(args), **{k: saved[k] for k in vars(args) if k in saved}}
    merged.update({k: v for k, v in explicit.items() if k in RUN_CONTROL})
    return argparse.Namespace(**merged)


def check_args(parser, args):
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    if args.global_batch_size % world_size:
        parser.error(f"--global-batch-size {args.global_batch_size} is not divisible by the world size {world_size}")
    if not args.data_path:
        parser.error("--data-path is required")
    if args.data_path not in (*EMBEDDED, *CAPTIONED) and not os.path.exists(args.data_path):
        parser.error(f"--data-path {args.data_path} does not exist")
    if args.stage == "gan":
        for flag in ("init", "real_data"):
            if not getattr(args, flag):
                parser.error(f"--stage gan needs --{flag.replace('_', '-')}")
        if not args.resume and not os.path.exists(args.init):  # a resumed run needs only its own checkpoint
            parser.error(f"--init {args.init} does not exist")
        if args.real_data not in EMBEDDED and not os.path.isdir(args.real_data):
            parser.error(f"--real-data {args.real_data} does not exist")
        if not args.resume:  # a resumed run keeps the --init and --real-data it was checked with
            check_init(parser, args)
    check_ema(parser, args)
    check_keep_last(parser, args)
    if args.wandb and importlib.util.find_spec("wandb") is None:
        parser.error("--wandb needs the wandb package (pip install wandb); WANDB_MODE=offline logs without a network")
    if args.tensorboard and importlib.util.find_spec("tensorboard") is None:
        parser.error("--tensorboard needs the tensorboard package (pip install tensorboard)")
    if args.attention == "flex" and not args.compile:
        parser.error("--attention flex needs --compile (eager FlexAttention materialises every score)")
    check_student_fed(parser, args)


def check_init(parser, args):
    """--init must be an ARD student, and --real-data must fit it as its record describes it (nothing loads): the
    image size, the channels the teacher takes (RGB through a VAE) and the classes, since a real image's label
    indexes the student's classes."""
    found = describe_checkpoint(args.init)
    if found.kind != "student":
        parser.error(f"--init {args.init} is not an ARD checkpoint (a {found.kind} checkpoint)")
    student = found.settings
    if "dit" not in student:  # a text-to-image student: AdversarialTask says why it cannot fine-tune it
        return
    size, channels, num_classes = image_format(args.real_data)
    want_size, want_classes = student["image_size"], student["dit"]["num_classes"]
    want_channels = student["dit"]["in_channels"] if student["vae"] == "none" else 3
    mismatches = []
    if size not in (None, want_size):
        mismatches.append(f"{size}x{size} images, the student's are {want_size}x{want_size}")
    if channels != want_channels:
        mismatches.append(f"{channels}-channel images, the student's have {want_channels}")
    if num_classes != want_classes:
        mismatches.append(f"{num_classes} classes, the student's {want_classes}")
    if mismatches:
        parser.error(f"--real-data {args.real_data} does not fit the student of --init {args.init}: "
                     + "; ".join(mismatches))


def check_keep_last(parser, args):
    if args.keep_last < 0:
        parser.error(f"--keep-last must be >= 0 (0 keeps every checkpoint), got {args.keep_last}")


def check_ema(parser, args):
    if not 0 <= args.ema_decay < 1:
        parser.error(f"--ema-decay must be in [0, 1), got {args.ema_decay}")
    if args.ema_rampup < 0 or args.ema_rampup and args.ema_decay == 0:
        parser.error(f"--ema-rampup must be >= 0 (and needs --ema-decay > 0), got {args.ema_rampup}")


def check_student_fed(parser, args):
    if not 0 <= args.student_fed <= 1:
        parser.error(f"--student-fed must be in [0, 1], got {args.student_fed}")
    if args.student_fed_ramp < 0:
        parser.error(f"--student-fed-ramp must be >= 0, got {args.student_fed_ramp}")
    for flag in ("student_fed_ramp", "student_fed_ema"):
        if getattr(args, flag) and not args.student_fed:
            parser.error(f"--{flag.replace('_', '-')} needs --student-fed > 0")
    if args.student_fed and args.stage == "teacher":
        parser.error("--student-fed applies to --stage ard and gan (a student's rollouts), not teacher")
    num_steps = args.num_steps
    if args.student_fed and args.stage == "gan" and not args.resume:  # a new GAN run's student is --init's
        num_steps = describe_checkpoint(args.init).settings.get("num_steps", num_steps)
    if args.student_fed and num_steps < 2:
        parser.error(f"--student-fed needs --num-steps >= 2 (one step has no input after x_T); got {num_steps}")


# ---------------------------------------------------------------------------- main loop

def export(checkpoint_path, out, half=False):
    """A checkpoint's EMA weights: a PixArt teacher's as a pipeline folder, any other's as .safetensors."""
    found = describe_checkpoint(checkpoint_path)
    if found.kind not in ("student", "teacher"):
        raise ValueError(f"--export takes one of our checkpoints; {checkpoint_path} is a {found.kind} file")
    checkpoint = dict(ema=found.state_dict, args=found.settings)
    if (found.settings.get("family"), found.kind) == ("pixart", "teacher"):
        pixart.export_pipeline(checkpoint, checkpoint_path, out, half=half)
        print(f"exported the EMA weights of {checkpoint_path} as the pipeline folder {out}")
    else:
        export_ema(checkpoint, out, half=half)
        print(f"exported the EMA weights of {checkpoint_path} to {out}")
    return out


def main(argv=None):
    args = parse_args(argv)
    if args.export:
        return export(*args.export, half=args.export_half)
    settings = run_settings(args)  # as the command gave them, before a task completes them
    rank, world_size, device = init_distributed(args.dist_timeout, args.device)
    stop = StopRequest(args.stop_signals)  # before loading: a signal during start-up stops after the first step
    # --precision fp32 is IEEE fp32; under bf16 what stays fp32 (stage heads and readouts, the GAN's VAE encode of
    # real images) rounds 8x finer in TF32 than the bf16 backbone does, and runs on the tensor cores
    allow_tf32(args.precision == "bf16")
    torch.manual_seed(args.global_seed)  # the initial weights of new modules
    resumed, resume_notes = resume_point(args.resume)
    task = task_class(args)(args, device, resumed)
    checkpoint = resumed or task.init_checkpoint
    start_step = resumed["step"] if resumed else 0
    data = batches(task.data, args, rank, world_size, start_step)
    discriminator = getattr(task, "discriminator", None)
    real_data = batches(task.real, args, rank, world_size, start_step, seed_offset=1) if discriminator else None

    experiment_dir = on_rank_zero(rank, lambda: prepare_experiment_dir(args, settings))
    logger = create_logger(experiment_dir, rank)

    model = task.model.to(device)
    ema = copy.deepcopy(model).requires_grad_(False).eval()
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay,
                            fused=device.type == "cuda")
    if checkpoint is not None:  # an export (--init) holds the EMA weights alone: the model starts from them too
        model.load_state_dict(checkpoint.get("model", checkpoint["ema"]))
        ema.load_state_dict(checkpoint["ema"])
        if "opt" in checkpoint:
            opt.load_state_dict(checkpoint["opt"])
        if "disc_heads" in checkpoint:
            task.discriminator.heads.load_state_dict(checkpoint["disc_heads"])
            task.disc_opt.load_state_dict(checkpoint["disc_opt"])
        for group in opt.param_groups:  # the flags decide, also for a run initialised from another stage
            group["lr"], group["weight_decay"] = args.lr, args.weight_decay
    reference = (checkpoint or {}).get("reg_reference") if resumed else None  # not --init's
    del checkpoint, resumed
    task.init_checkpoint = None
    if args.student_fed_ema:
        task.rollout_model = ema
    if args.compile and args.student_fed:  # the rollouts (K-1 stages of sampling) compiled like the training pass
        task.rollout_model.sample = torch.compile(task.rollout_model.sample)

    ddp = distributed(model, device)
    forward_model = torch.compile(ddp) if args.compile else ddp
    ddp_disc = distributed(discriminator, device) if discriminator is not None else None
    bf16 = autocast(device, args.precision)
    record = dict(vars(args), **task.record)
    logger.info(f"{args.stage}: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters, "
                f"{len(task.data)} training items, world size {world_size}, experiment {experiment_dir}")
    for note in [*resume_notes, *task.notes]:
        logger.info(note)

    model.train()
    group, writing = checkpoint_group(args.dist_timeout), None
    running, steps_since_log, last_log = {}, 0, time.time()
    bar = progress(args.iterations, args.stage, "step", enabled=rank == 0, initial=start_step, lines=False)
    guard = DivergenceGuard(task.warmup, reference) if discriminator is not None else None
    trackers = open_trackers(args, experiment_dir, record, start_step, rank)
    for step in range(start_step, args.iterations):
        seed_step(args.global_seed, step, rank)
        batch = [t.to(device, non_blocking=True) for t in next(data)]
        with bf16:
            loss, logs = task.loss(forward_model, batch, step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.max_grad_norm)
        opt.step()
        update_ema(ema, model, ema_decay(args.ema_decay, step + 1, args.ema_rampup))
        logs = dict(logs, loss=loss.detach(), grad_norm=grad_norm)
        if discriminator is not None:
            real_batch = [t.to(device, non_blocking=True) for t in next(real_data)]
            logs.update(task.discriminator_step(ddp_disc, real_batch, bf16))
        for name, value in logs.items():  # (sum, count): a value may be missing in some steps (GAN warm-up)
            total, count = running.get(name, (0, 0))
            running[name] = (total + value.detach().float(), count + 1)
        steps_since_log += 1
        bar.update()

        done = step + 1
        stopping = stop.agreed() and done < args.iterations  # at the end, the run is done
        saving = done % args.ckpt_every == 0 or done == args.iterations or stopping
        if done % args.log_every == 0 or saving:
            means = mean_over_ranks({k: total / count for k, (total, count) in running.items()})
            if not math.isfinite(means["loss"]):
                wait_for(writing)
                raise FloatingPointError(f"loss became {means['loss']} before step {done}; stopping with the last good "
                                         f"checkpoint {last_checkpoint(experiment_dir)}")
            speed = steps_since_log / (time.time() - last_log)
            logger.info(f"step {done:07d} " + " ".join(f"{k}={v:.4g}" for k, v in sorted(means.items()))
                        + f" steps/s={speed:.2f}")
            if trackers:
                trackers.log(done, dict(means, lr=opt.param_groups[0]["lr"], steps_per_s=speed,
                                        samples_per_s=speed * args.global_batch_size))
            bar.set_postfix(loss=f"{means['loss']:.4g}")
            running, steps_since_log, last_log = {}, 0, time.time()
            if guard is not None and guard.diverged(done, means["reg"]) and args.divergence_guard:
                wait_for(writing)  # the last good checkpoint is complete before it is named
                raise RuntimeError(guard.message(done, means["reg"], last_checkpoint(experiment_dir)))
        if saving:
            wait_for(writing)  # one write at a time
            state = {"model": model.state_dict(), "ema": ema.state_dict(), "opt": opt.state_dict(),
                     "step": done, "args": record}
            if discriminator is not None:  # the frozen features are the teacher's: not saved again
                state.update(disc_heads=discriminator.heads.state_dict(), disc_opt=task.disc_opt.state_dict(),
                             reg_reference=guard.reference)
            writing = save_checkpoint(os.path.join(experiment_dir, "checkpoints", f"{done:07d}"), state, group,
                                      args.keep_last)
        if stopping:
            wait_for(writing)  # the stop checkpoint is complete on every rank before the exit
            if trackers:
                trackers.close()
            logger.info(f"stopped by {stop.received or 'a signal to another rank'} after step {done}; the same command "
                        f"continues the run (exit status {REQUEUE_EXIT_CODE})")
            cleanup_distributed()
            raise SystemExit(REQUEUE_EXIT_CODE)
        if done % args.sample_every == 0 or done == args.iterations:
            path = os.path.join(experiment_dir, "samples", f"{done:07d}.png")
            on_rank_zero(rank, lambda: save_samples(task, ema, args, path, device))
    bar.close()
    wait_for(writing)
    if trackers:
        trackers.close()
    logger.info("done")
    cleanup_distributed()
    return experiment_dir


def last_checkpoint(experiment_dir):
    saved = checkpoint_paths(experiment_dir)
    return saved[-1] if saved else "(none written yet)"


# The regression loss of a --stage gan run, as a multiple of its level at the end of the warm-up, past which the
# run is stopped. In the GAN study (README) the paper's weight scale x 10 ran away on every digits seed: 2.3e-4 at
# the end of the warm-up, x 60 after 25 adversarial steps, 7.3 (x 30,000) by step 175; on the shapes it rose x 33
# before the samples fell apart. The stable x 1 doubled over 400 steps. x 20 is ten times what a stable stage
# reached and is passed by a runaway within a few dozen adversarial steps.
DIVERGENCE_MULTIPLE = 20


class DivergenceGuard:
    """Whether an adversarial stage's regression loss ran away (see DIVERGENCE_MULTIPLE)."""

    def __init__(self, warmup, reference=None):
        self.warmup, self.reference = warmup, reference

    def diverged(self, step, regression):
        """Whether `regression`, the mean over the log interval that ends after `step`, passes the limit. The level
        at the end of the warm-up is that of the last interval ending in it (or of the first, if none does)."""
        if step <= self.warmup or self.reference is None:
            self.reference = regression
        return regression > DIVERGENCE_MULTIPLE * self.reference

    def message(self, step, regression, last_checkpoint):
        return (f"the adversarial stage diverged: regression loss {regression:.3g} after step {step}, more than "
                f"{DIVERGENCE_MULTIPLE} times its {self.reference:.3g} at the end of the warm-up; stopping with the "
                f"last good checkpoint {last_checkpoint}. Lower --gan-weight-scale (x 1 was stable in the GAN study) "
                "or --lr, or pass --no-divergence-guard to go on")


class Trackers:
    """Every scalar of log.txt, the learning rate and the throughput to TensorBoard (--tensorboard, event files in
    the run's tensorboard/) and W&B (--wandb, the run's wandb/; WANDB_MODE=offline logs without a network)."""

    def __init__(self, args, experiment_dir, record, start_step):
        self.tensorboard = self.wandb = None
        if args.tensorboard:
            from torch.utils.tensorboard import SummaryWriter
            self.tensorboard = SummaryWriter(os.path.join(experiment_dir, "tensorboard"),
                                             purge_step=start_step + 1)  # what a restart logs again
        if args.wandb:
            import wandb
            self.wandb = wandb.init(project=args.wandb, dir=experiment_dir, name=os.path.basename(experiment_dir),
                                    id=wandb_run_id(experiment_dir), resume="allow", config=record)

    def log(self, step, scalars):
        for name, value in scalars.items():
            if self.tensorboard:
                self.tensorboard.add_scalar(name, value, step)
        if self.wandb:
            self.wandb.log(scalars, step=step)

    def close(self):
        if self.tensorboard:
            self.tensorboard.close()
        if self.wandb:
            self.wandb.finish()


def wandb_run_id(experiment_dir):
    """The run's W&B id, made once and kept in its directory, so that a restart continues the same W&B run while
    another run of the same directory name (another user, a deleted results/) never resumes it."""
    path = os.path.join(experiment_dir, "wandb.json")
    if not os.path.exists(path):
        save_json({"id": uuid.uuid4().hex[:16]}, path)
    with open(path) as f:
        return json.load(f)["id"]


def open_trackers(args, experiment_dir, record, start_step, rank):
    """Rank 0's Trackers (None on the others); an error opening them (W&B without a key, say) stops every rank
    rather than leaving the others waiting in the first step's all-reduce."""
    opened = {}
    on_every_rank(lambda: opened.update(trackers=Trackers(args, experiment_dir, record, start_step)) if rank == 0
                  else None)
    return opened.get("trackers")


def label_grid(config, seed):
    """Fixed noise and labels (two per class, up to 32 images) of a DiT's sample grids."""
    shape = (config["in_channels"], config["input_size"], config["input_size"])
    count = min(32, 2 * config["num_classes"])
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(count, *shape, generator=generator), (torch.arange(count) % config["num_classes"],)


@torch.no_grad()
def save_samples(task, ema, args, path, device):
    """A grid from the EMA weights, on the task's fixed noise and conditions."""
    noise, condition = task.grid_inputs(args.global_seed)
    samples = task.generate(ema, noise.to(device), *(c.to(device) for c in condition))
    images = task.autoencoder.decode(samples)
    save_grid(images.clamp(-1, 1), path, nrow=min(8, len(noise)), scale=max(1, 64 // images.shape[-1]))


if __name__ == "__main__":
    main()
