"""Solve the teacher's probability-flow ODE from seeded noise and keep the points the student learns.

    torchrun --nproc_per_node=8 extract_trajectories.py --ckpt DiT-XL-2-256x256.pt \\
        --out trajectories/imagenet256 --num-samples 1200000

Per sample: the noise x_T, the ODE state and the teacher's x0-prediction at the K-1
intermediate student boundaries, and the final sample. The output directory holds meta.json
and fixed-size safetensors shards; shard i depends only on (seed, i), so the bytes do not
depend on the number of processes, and a re-run skips the shards already complete. SIGTERM or
SIGUSR1 (--stop-signals) stops each rank after the shard it is writing, with exit status 75.

Text-to-image (PixArt-Sigma through diffusers): --prompts gives a prompt file and --ckpt the pipeline,

    torchrun --nproc_per_node=8 extract_trajectories.py --prompts captions.txt \
        --ckpt PixArt-alpha/PixArt-Sigma-XL-2-512-MS --out trajectories/pixart512 --num-samples 1000000

Flow-matching teachers (SiT, REPA; transport/) solve with Euler or Heun on the linear interpolant,

    torchrun --nproc_per_node=8 extract_trajectories.py --ckpt SiT-XL-2-256x256.pt --teacher-family flow \
        --solver heun --teacher-steps 25 --out trajectories/sit256 --num-samples 1200000

with the stages at every (S/K)-th point of the teacher's (possibly --time-shift'ed) grid.

Shards of text-to-image runs hold prompt indices in place of labels. Every prompt is encoded once before any
solve into the text table text/ (T5 embeddings without their padding, the negative prompt "" last) beside
prompts.json; no embedding is stored per trajectory. The table is written in chunks of --text-chunk prompts,
each encoded by one rank (chunk c by rank c mod world size) in fixed batches, so its bytes do not depend on
the number of processes, a re-run encodes only the missing chunks, and a rank holds one chunk at a time.
"""
import argparse
import contextlib
import hashlib
import json
import math
import os
import shutil
from concurrent.futures import ThreadPoolExecutor

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch.utils.data import Dataset

import pixart
from ard import TARGETS
from diffusion import create_diffusion, student_timesteps
from models import TEACHER_FAMILIES, clips_x0, load_teacher, with_guidance
from transport import (ADAPTIVE, CONVENTIONS, LAST_STEPS, SOLVERS, GuidedVelocity, last_step_of, solve_progressive,
                       student_steps, time_grid)
from utils import (StopRequest, add_distributed_args, atomic_write, autocast, barrier, check_meta, cleanup_distributed,
                   index_noise_and_labels, index_seed, init_distributed, on_every_rank, on_rank_zero, progress,
                   save_json)

# 2: meta.json records teacher_weights_sha256; 3: and clip_denoised (pixel space); 4: and noise_stream;
# 5: and teacher_family (with a flow teacher's solver, grid, shift, convention and guidance interval); 6: a flow
# solve's last_step.
# Prompt trajectories also record text_chunk: their text table is text/'s chunk files (before: one file).
FORMAT_VERSION = 6
TEXT_TABLE = "text"  # the directory of the text table's chunk files


def shard_path(directory, index):
    return os.path.join(directory, f"shard_{index:05d}.safetensors")


def shard_shapes(meta):
    """The tensors of one shard and their shapes."""
    K, shape, n = meta["num_steps"], tuple(meta["shape"]), meta["shard_size"]
    return {"state": (n, K + 1, *shape), "x0": (n, K - 1, *shape), condition_key(meta): (n,), "seeds": (n,)}


def condition_key(meta):
    """What a shard stores per sample besides its points and seed: class labels, or prompt indices."""
    return meta.get("condition", "labels")


def check_shard(path, expected_shapes):
    """Raises unless the shard at `path` is whole: its header reads, holds `expected_shapes`, and
    the file is as long as the header says (safetensors checks that on opening; nothing more is read)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"missing shard {path}: re-run extract_trajectories.py to complete it")
    try:
        with safe_open(path, "pt") as f:
            shapes = {key: tuple(f.get_slice(key).get_shape()) for key in f.keys()}
    except Exception as e:
        raise ValueError(f"corrupt or truncated shard {path}: {e}") from None
    if shapes != expected_shapes:
        raise ValueError(f"shard {path} holds {shapes}, expected {expected_shapes}")


def shard_bytes(meta):
    """Bytes of one full shard's arrays (the header adds a few hundred)."""
    point = 2 * meta["shape"][0] * meta["shape"][1] * meta["shape"][2]  # float16
    return meta["shard_size"] * ((2 * meta["num_steps"]) * point + 2 * 8)  # K+1 states, K-1 x0, label/prompt, seed


def ddim_settings(args):
    """The DDIM solve's meta fields: the stage boundaries on the respaced grid, in integer timesteps."""
    steps, times = student_timesteps(args.num_steps, args.teacher_steps)
    return dict(solver="ddim", eta=0.0, boundary_steps=steps, boundary_times=times)


def flow_settings(args, time_convention):
    """A flow solve's meta fields: solver and its last step, grid, convention, guidance interval and the stage
    boundaries, as grid indices, noise levels and the network's own times (the student's stage times)."""
    steps = student_steps(args.num_steps, args.teacher_steps)
    sigmas = time_grid(args.teacher_steps, args.time_shift)[steps].tolist()
    last_step = last_step_of(args.solver, CONVENTIONS[time_convention], getattr(args, "last_step", None))
    return dict(solver=args.solver, last_step=last_step, time_grid="uniform" if args.time_shift == 1 else "shifted",
                time_shift=args.time_shift, time_convention=time_convention,
                guidance_interval=list(args.guidance_interval), boundary_steps=steps, boundary_sigmas=sigmas,
                boundary_times=[CONVENTIONS[time_convention].model_time(s) for s in sigmas])


def check_boundaries(meta, source):
    """Raises unless the stored stage boundaries are those of the solver grid that meta records (a time grid or
    a convention edited after the fact, or written by another version, stops here with the field)."""
    settings = argparse.Namespace(**meta)
    own = flow_settings(settings, meta["time_convention"]) if meta.get("teacher_family") == "flow" else \
        ddim_settings(settings)
    check_meta(meta, own, source)


def solver_meta(args, condition, clip_denoised, settings):
    """The meta fields of the solve and the storage, whatever the teacher; `clip_denoised`: whether
    x0-predictions are clipped to [-1, 1] (pixel space, as in ADM; latents never are); `settings`: the
    solver's own fields (ddim_settings, flow_settings)."""
    return dict(
        format=FORMAT_VERSION, clip_denoised=clip_denoised, teacher_steps=args.teacher_steps,
        cfg_scale=args.cfg_scale, num_steps=args.num_steps, **settings, dtype="float16",
        precision=args.precision, seed=args.seed, noise_stream=noise_stream(args), num_samples=args.num_samples,
        shard_size=args.shard_size,
        points={"state": "(n, K+1, C, H, W): x_T, the ODE state at boundary_times[1:], the final sample",
                "x0": "(n, K-1, C, H, W): the teacher's x0-prediction at boundary_times[1:] (its forward in fp32)",
                **condition, "seeds": "(n,) the seed of each sample's noise"})


def noise_stream(args):
    """Training trajectories draw from the trajectory stream; held-out ones (--held-out) from the evaluation
    stream, which train.py refuses."""
    return "evaluation" if args.held_out else "trajectories"


def build_meta(args, teacher_info):
    dit, family = teacher_info["dit"], teacher_info["teacher_family"]
    flow = family == "flow"
    settings = flow_settings(args, teacher_info["time_convention"]) if flow else ddim_settings(args)
    return dict(
        solver_meta(args, {"labels": "(n,) class labels"}, clip_denoised=clips_x0(teacher_info["vae"]) and not flow,
                    settings=settings),
        teacher_family=family, teacher_ckpt=teacher_info["ckpt"], teacher_weights_sha256=teacher_info["weights_sha256"], dit=dit,
        image_size=teacher_info["image_size"], vae=teacher_info["vae"],
        shape=[dit["in_channels"], dit["input_size"], dit["input_size"]], guidance_channels=args.guidance_channels,
        labels=args.labels, num_classes=dit["num_classes"])


def build_prompt_meta(args, teacher_info, prompts):
    return dict(
        solver_meta(args, {"prompts": "(n,) indices into prompts.json and the text table text/"},
                    clip_denoised=clips_x0(teacher_info["vae"]),
                    settings=ddim_settings(args)),
        condition="prompts", family="pixart", teacher_ckpt=teacher_info["teacher"],
        teacher_weights_sha256=teacher_info["weights_sha256"], pixart=teacher_info["pixart"], vae=teacher_info["vae"],
        shape=teacher_info["shape"], text_encoder=teacher_info["text_encoder"], text_tokens=pixart.TEXT_TOKENS,
        negative_prompt="", prompt_order=args.labels, num_prompts=len(prompts), text_chunk=args.text_chunk,
        prompts_sha256=hashlib.sha256(json.dumps(prompts).encode()).hexdigest())


def boundary_points(steps, start, boundaries, n):
    """(states (n, K+1, ...), x0 (n, K-1, ...)) kept from a progressive solve's outputs `steps` (dicts of "sample"
    and "pred_xstart") from `start`: the state and x0-prediction at each step index in `boundaries`, the final
    sample last; of each batch its first n rows."""
    states, x0, x = [start[:n]], [], start
    for step, out in enumerate(steps):
        if step in boundaries:
            states.append(x[:n])
            x0.append(out["pred_xstart"][:n])
        x = out["sample"]
    states.append(x[:n])
    return torch.stack(states, dim=1), torch.stack(x0, dim=1)


@torch.no_grad()
def solve_trajectories(model_fn, diffusion, noise, model_kwargs, meta):
    """boundary_points of DDIM solves; `model_fn` is the guided teacher and `noise`/`model_kwargs` its
    (possibly doubled) batch, whose first n rows are kept."""
    n = noise.shape[0] // (2 if meta["cfg_scale"] > 1 else 1)
    steps = diffusion.ddim_sample_loop_progressive(model_fn, noise.shape, noise, clip_denoised=meta["clip_denoised"],
                                                   model_kwargs=model_kwargs)
    return boundary_points(steps, noise, meta["boundary_steps"][1:], n)


@contextlib.contextmanager
def exact_fp32():
    """fp32 matmuls and convolutions without TF32 within the block."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def fp32_at_boundaries(guided, low_precision, meta):
    """The solver's model function: the guided teacher under `low_precision` (bf16 autocast) except at
    the boundaries whose x0-predictions are stored, where it runs in fp32. An x0-prediction multiplies
    the ε error by sqrt(1/ᾱ_t - 1), 17 at t=749, so bf16's rounding would dominate those targets."""
    exact = set(meta["boundary_times"][1:])

    def model_fn(x, t, **kwargs):
        with exact_fp32() if int(t[0]) in exact else low_precision:
            return guided(x, t, **kwargs).float()
    return model_fn


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True, help="official DiT name (DiT-XL-2-256x256.pt) or a teacher checkpoint; "
                                                 "with --prompts a PixArt pipeline (hub name or local folder)")
    p.add_argument("--prompts", help="text-to-image: a prompt file (one per line, or COCO captions .json)")
    p.add_argument("--model", default="DiT-XL/2", help="architecture of an official/bare checkpoint")
    p.add_argument("--image-size", type=int, default=256)
    add_component_args(p)
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--num-samples", type=int, default=1_200_000)
    p.add_argument("--shard-size", type=int, default=1000)
    p.add_argument("--batch-size", type=int, default=250,
                   help="samples per teacher forward (doubled by CFG); on GPUs the last bits may depend on it")
    p.add_argument("--num-steps", type=int, default=4, help="student steps K")
    p.add_argument("--teacher-steps", type=int, default=25)
    p.add_argument("--cfg-scale", type=float, default=None, help=f"default 1.5, with --prompts {pixart.CFG_SCALE}")
    p.add_argument("--guidance-channels", type=int, default=3,
                   help="guide the first C output channels (DiT and SiT: 3; REPA: 4, all)")
    add_flow_args(p)
    p.add_argument("--text-chunk", type=int, default=1024,
                   help="--prompts: prompts per text-table chunk (encoded and held by one rank at a time)")
    p.add_argument("--labels", choices=["balanced", "uniform"], default="balanced",
                   help="class labels, or with --prompts the prompt of each sample: index mod count, or random")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--held-out", action="store_true",
                   help="draw the noise from the evaluation stream (as sample_ddp.py does): trajectories for "
                        "diagnostics and fidelity, never for training (train.py refuses them)")
    p.add_argument("--precision", choices=["bf16", "fp32"], default="bf16",
                   help="teacher forward on GPU (fp32 at the K-1 boundaries whose x0-predictions are stored)")
    p.add_argument("--compile", action="store_true", help="torch.compile the teacher")
    add_distributed_args(p)
    args = p.parse_args(argv)
    if args.cfg_scale is None:
        args.cfg_scale = pixart.CFG_SCALE if args.prompts else 1.5
    if min(args.num_samples, args.shard_size, args.batch_size, args.text_chunk) < 1:
        p.error("--num-samples, --shard-size, --batch-size and --text-chunk must be positive")
    if args.num_samples % args.shard_size:
        p.error(f"--num-samples {args.num_samples} must be a multiple of --shard-size {args.shard_size}")
    if args.cfg_scale < 1:
        p.error(f"--cfg-scale must be >= 1, got {args.cfg_scale}")
    if args.prompts and args.teacher_family != "ddpm":
        p.error("--prompts (PixArt) teachers are DDPM teachers; drop --teacher-family")
    check_pixart_sources(p, args, text_to_image=bool(args.prompts))
    check_flow_args(p, args)
    return args


def add_component_args(p):
    """--vae and --text-encoder, shared with sample.py."""
    own = f"default: the pipeline's own, else {pixart.COMPONENTS}"
    p.add_argument("--vae", help="the VAE an official checkpoint works with: ema (default), mse, none, or a local "
                                 "diffusers folder (a VA-VAE converted by vavae.py included); a PixArt teacher's: "
                                 f"a folder or hub name with vae/ ({own})")
    p.add_argument("--text-encoder", help="a PixArt teacher's T5 and tokenizer: a folder or hub name with "
                                          f"text_encoder/ and tokenizer/ ({own})")


def check_pixart_sources(p, args, text_to_image):
    """--text-encoder is for PixArt teachers; --vae defaults to DiT's "ema" for the others (a PixArt teacher's
    default is its own, pixart.pipeline_vae)."""
    if args.text_encoder and not text_to_image:
        p.error("--text-encoder is for PixArt teachers (text-to-image)")
    if not text_to_image:
        args.vae = args.vae or "ema"


def add_flow_args(p, adaptive=False):
    """The teacher family and a flow teacher's solve (transport/), shared with sample.py; `adaptive` offers SiT's
    dopri5 (a teacher's reference row; trajectories need a fixed grid)."""
    p.add_argument("--teacher-family", choices=list(TEACHER_FAMILIES), default="ddpm",
                   help="ddpm: an ε-prediction teacher (DiT), DDIM; flow: a velocity teacher (SiT, REPA), Euler/Heun")
    flow = p.add_argument_group("flow teachers (--teacher-family flow)")
    flow.add_argument("--time-convention", choices=list(CONVENTIONS), default=None,
                      help="sit: data at t=1; repa: data at t=0 (default: the checkpoint's own)")
    flow.add_argument("--solver", choices=SOLVERS + (ADAPTIVE,) * adaptive, default="euler",
                      help="heun: two evaluations a step" + (f"; {ADAPTIVE}: SiT's adaptive solve (torchdiffeq, "
                                                             "atol 1e-6, rtol 1e-3; the step count is unused)"
                                                             if adaptive else ""))
    flow.add_argument("--last-step", choices=LAST_STEPS, default=None,
                      help="Heun's last step: heun as SiT's torchdiffeq heun2, euler as REPA's sampler "
                           "(default: the teacher's own, by its time convention)")
    flow.add_argument("--time-shift", type=float, default=1.0,
                      help="grid σ -> sσ/(1+(s-1)σ) over the uniform one (1: uniform)")
    flow.add_argument("--guidance-interval", type=float, nargs=2, default=[0.0, 1.0], metavar=("LOW", "HIGH"),
                      help="guide only at noise levels σ in [LOW, HIGH] (REPA's t; its FID 1.42 run: 0 0.7)")


def check_flow_args(p, args):
    if args.teacher_family == "ddpm":
        changed = [f for f, default in (("time_convention", None), ("solver", "euler"), ("last_step", None),
                                         ("time_shift", 1.0), ("guidance_interval", [0.0, 1.0]))
                   if getattr(args, f) != default]
        if changed:
            p.error(f"--{changed[0].replace('_', '-')} is for flow teachers (--teacher-family flow)")
    if args.time_shift <= 0:
        p.error(f"--time-shift must be positive, got {args.time_shift}")
    low, high = args.guidance_interval
    if not 0 <= low <= high <= 1:
        p.error(f"--guidance-interval must satisfy 0 <= LOW <= HIGH <= 1, got {low} {high}")
    if args.last_step == "heun" and args.solver != "heun":
        p.error(f"--last-step heun is for --solver heun, got --solver {args.solver}")


def missing_shards(directory, meta):
    """{index: None if absent, else what is wrong with it} of the shards still to write."""
    missing = {}
    for i in range(meta["num_samples"] // meta["shard_size"]):
        try:
            check_shard(shard_path(directory, i), shard_shapes(meta))
        except FileNotFoundError:
            missing[i] = None
        except ValueError as e:
            missing[i] = str(e)
    return missing


def prepare_output(args, meta, missing):
    """Checks meta.json against this run (or writes it) and that the missing shards fit on disk."""
    meta_path = os.path.join(args.out, "meta.json")
    if os.path.exists(meta_path):
        with open(meta_path) as f:
            check_meta(json.load(f), meta, f"{meta_path} (from an earlier run with other settings)")
    for damage in filter(None, missing.values()):
        print(f"{damage}: writing it again")
    needed, free = len(missing) * shard_bytes(meta), shutil.disk_usage(args.out).free
    print(f"{len(missing)} shards to write, about {needed / 2 ** 30:.2f} GiB ({free / 2 ** 30:.1f} GiB free)")
    if needed > free:
        raise OSError(f"not enough disk space in {args.out}: need {needed / 2 ** 30:.2f} GiB, "
                      f"{free / 2 ** 30:.2f} GiB free")
    save_json(meta, meta_path)


class DDIMTeacher:
    """A teacher solved by DDIM on the respaced grid; subclasses give the guided model (`guided`)."""

    def solver(self, model, device, precision):
        """solve(noise, condition) -> (states, x0) of the teacher `model` on `device`."""
        diffusion, bf16 = create_diffusion(str(self.args.teacher_steps)), autocast(device, precision)

        def solve(noise, condition):
            guided, noise, model_kwargs = self.guided(noise.to(device), condition.to(device))
            return solve_trajectories(fp32_at_boundaries(guided, bf16, self.meta), diffusion, noise, model_kwargs,
                                      self.meta)
        return solve


class LabelTeacher(DDIMTeacher):
    """A class-conditional DiT on seeded labels, guided by DiT's CFG with the null class; with
    --teacher-family flow a velocity teacher solved by FlowTeacher."""

    def __init__(self, args):
        self.network, info = load_teacher(args.ckpt, args.model, args.image_size, args.vae, family=args.teacher_family,
                                          time_convention=args.time_convention)
        self.meta = build_meta(args, info)
        self.args = args

    def prepare(self, directory, device):
        """Rank 0's work before any shard: none here."""

    def prepare_every_rank(self, directory, device, rank, world_size):
        """Every rank's work before any shard: none here."""

    def conditions(self, indices):
        """(noise, labels) of the samples at `indices`."""
        return index_noise_and_labels(self.args.seed, indices, self.meta["shape"], self.meta["num_classes"],
                                      self.args.labels, self.meta["noise_stream"])

    def guided(self, noise, labels):
        """(model_fn, noise, model_kwargs) of the guided solve; the batch doubled under CFG."""
        fn, noise, labels = with_guidance(self.network, noise, labels, self.args.cfg_scale,
                                          self.args.guidance_channels)
        return fn, noise, dict(y=labels)


class FlowTeacher(LabelTeacher):
    """A class-conditional flow-matching teacher (SiT, REPA) solved by transport's Euler or Heun in float64, CFG on
    its guided channels inside the guidance interval."""

    def solver(self, model, device, precision):
        meta, bf16 = self.meta, autocast(device, precision)
        velocity = GuidedVelocity(model, CONVENTIONS[meta["time_convention"]], meta["cfg_scale"],
                                  meta["guidance_channels"], meta["guidance_interval"])
        grid = time_grid(meta["teacher_steps"], meta["time_shift"])

        def solve(noise, labels):
            noise = noise.to(device)
            with bf16:
                steps = solve_progressive(velocity, noise, grid, labels.to(device), meta["solver"], meta["last_step"])
                states, x0 = boundary_points(steps, noise.double(), meta["boundary_steps"][1:], len(noise))
            return states.float(), x0.float()
        return solve


class PromptTeacher(DDIMTeacher):
    """A PixArt transformer (diffusers; a hub name or a pipeline folder) on the prompts of a file.
    Sample i takes prompt i mod P (--labels balanced) or a random one (uniform); CFG takes the
    negative prompt "". Every prompt is encoded once into the text table (text/), beside prompts.json."""

    def __init__(self, args):
        self.prompts = pixart.read_prompts(args.prompts)
        pixart.check_pixart(args.ckpt, args.text_encoder, args.vae)  # before any weights are read
        self.network, info = pixart.load_pixart(args.ckpt, args.text_encoder, args.vae)
        self.meta = build_prompt_meta(args, info, self.prompts)
        self.args, self.table = args, None

    def prepare(self, directory, device):
        save_json(self.prompts, os.path.join(directory, "prompts.json"))
        os.makedirs(os.path.join(directory, TEXT_TABLE), exist_ok=True)

    def prepare_every_rank(self, directory, device, rank, world_size):
        """This rank's chunks of the text table that are not on disk yet: chunk c (prompts c·C to (c+1)·C,
        the negative prompt last) on rank c mod world size, in batches of --batch-size within the chunk."""
        texts, size = [*self.prompts, self.meta["negative_prompt"]], self.args.text_chunk
        table = os.path.join(directory, TEXT_TABLE)
        missing = [c for c in range(math.ceil(len(texts) / size))
                   if not os.path.isfile(pixart.text_chunk_path(table, c))]
        mine = [c for c in missing if c % world_size == rank]  # each rank decides only about its own chunks
        if not mine:
            return
        encoder, batch = pixart.PromptEncoder(self.meta["text_encoder"], device), self.args.batch_size
        bar = progress(len(missing) * size, "T5", "prompt", enabled=rank == 0)

        def write(chunk):  # its embeddings are freed on return: a rank holds one chunk at a time
            part = texts[chunk * size:(chunk + 1) * size]
            pixart.write_text_chunk(pixart.text_chunk_path(table, chunk),
                                    [e for i in range(0, len(part), batch) for e in encoder.encode(part[i:i + batch])])
        for chunk in mine:
            write(chunk)
            bar.update(size * world_size)  # rank 0's bar (the only one drawn) stands for every rank
        bar.close()

    def conditions(self, indices):
        return index_noise_and_labels(self.args.seed, indices, self.meta["shape"], len(self.prompts),
                                      self.args.labels, self.meta["noise_stream"])

    def guided(self, noise, prompts):
        if self.table is None:
            self.table = pixart.TextTable(os.path.join(self.args.out, TEXT_TABLE))
        text, mask = self.table.batch(prompts)
        if self.args.cfg_scale > 1:
            null_text, null_mask = self.table.batch([self.table.null] * len(prompts))
            noise, text, mask = torch.cat([noise, noise]), torch.cat([text, null_text]), torch.cat([mask, null_mask])
        fn = pixart.guided_teacher(self.network, self.args.cfg_scale)
        return fn, noise, dict(text=text.to(noise.device), text_mask=mask.to(noise.device))


def main(argv=None):
    args = parse_args(argv)
    rank, world_size, device = init_distributed(args.dist_timeout, args.device)
    stop = StopRequest(args.stop_signals)  # before loading: a signal during start-up stops at the first shard
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    teacher = (PromptTeacher if args.prompts else FlowTeacher if args.teacher_family == "flow" else LabelTeacher)(args)
    meta = teacher.meta
    os.makedirs(args.out, exist_ok=True)
    missing = missing_shards(args.out, meta)  # listed by every rank before any shard is written

    def prepare():
        prepare_output(args, meta, missing)
        teacher.prepare(args.out, device)
    on_rank_zero(rank, prepare)
    on_every_rank(lambda: teacher.prepare_every_rank(args.out, device, rank, world_size))
    model = teacher.network.to(device)
    if args.compile:
        model.forward = torch.compile(model.forward)  # forward_with_cfg calls it too
    solve = teacher.solver(model, device, args.precision)

    mine = list(missing)[rank::world_size]
    bar = progress(len(missing) * args.shard_size, "extraction", "traj", enabled=rank == 0)
    with ThreadPoolExecutor(max_workers=1) as writer:  # writes overlap with the next shard's solve
        pending = None
        for j, shard in enumerate(mine):
            if stop.received:
                break
            indices = range(shard * args.shard_size, (shard + 1) * args.shard_size)
            noise, condition = teacher.conditions(indices)
            parts = [solve(noise[i:i + args.batch_size], condition[i:i + args.batch_size])
                     for i in range(0, len(indices), args.batch_size)]
            tensors = {"state": torch.cat([s for s, _ in parts]).half().cpu(),
                       "x0": torch.cat([x for _, x in parts]).half().cpu(),
                       condition_key(meta): condition, "seeds": torch.tensor([index_seed(args.seed, i) for i in indices])}
            if pending is not None:
                pending.result()
            path = shard_path(args.out, shard)
            pending = writer.submit(atomic_write, path, lambda tmp, t=tensors: save_file(t, tmp))
            bar.update(args.shard_size * min(world_size, len(missing) - j * world_size))  # all ranks' shards
        if pending is not None:
            pending.result()
    bar.close()
    stop.exit_if_agreed("every shard this rank finished is written")
    barrier()
    if rank == 0:
        print(f"trajectories in {args.out}")
    cleanup_distributed()


class TrajectoryDataset(Dataset):
    """Stage inputs, targets and condition of each stored trajectory, read lazily from the shards:
    the class label, or for prompts the T5 text padded to the table's longest prompt and its mask.

    target "state": inputs [x_T, x_τ1, ..., x_τ(K-1)], targets [x_τ1, ..., x_τ(K-1), x_0];
    target "x0": the intermediate points are the teacher's x0-predictions at τ_1..τ_(K-1).
    `expected` holds meta fields the student relies on (K, boundary times, shape, teacher);
    a mismatch stops here with the differing field. Unless `held_out`, the trajectories must be
    training ones: a student never trains on evaluation noise.
    """

    def __init__(self, directory, target="state", expected=None, held_out=False):
        if target not in TARGETS:
            raise ValueError(f"target must be one of {TARGETS}, got {target!r}")
        meta_path = os.path.join(directory, "meta.json")
        if not os.path.isfile(meta_path):
            raise FileNotFoundError(f"no trajectories at {directory} (missing {meta_path})")
        with open(meta_path) as f:
            self.meta = json.load(f)
        stream = "evaluation" if held_out else "trajectories"
        if self.meta.get("noise_stream") != stream:
            raise ValueError(f"{meta_path}: expected {stream} trajectories (noise_stream {stream!r}), found noise_stream "
                             f"{self.meta.get('noise_stream')!r}" + ("; held-out trajectories (extract_trajectories.py "
                                                                     "--held-out) are for evaluation, never training"
                                                                     if not held_out else ""))
        check_meta(self.meta, expected or {}, meta_path)
        check_boundaries(self.meta, meta_path)
        self.directory, self.target = directory, target
        self.shard_size = self.meta["shard_size"]
        self.num_shards = self.meta["num_samples"] // self.shard_size
        for i in range(self.num_shards):
            check_shard(shard_path(directory, i), shard_shapes(self.meta))
        self.condition, self.text = condition_key(self.meta), None
        if self.condition == "prompts":
            if "text_chunk" not in self.meta:
                raise ValueError(f"{meta_path}: trajectories from before the chunked text table (text.safetensors); "
                                 "re-run extract_trajectories.py into a new directory")
            self.text = pixart.TextTable(os.path.join(directory, TEXT_TABLE))
            if len(self.text) != self.meta["num_prompts"] + 1:
                raise ValueError(f"{self.text.directory} holds {len(self.text)} embeddings, expected "
                                 f"{self.meta['num_prompts']} prompts and the negative one")
        self._handles = {}

    def __len__(self):
        return self.num_shards * self.shard_size

    def _handle(self, shard):
        # Opened lazily in each DataLoader worker; safetensors memory-maps the file.
        if shard not in self._handles:
            self._handles[shard] = safe_open(shard_path(self.directory, shard), "pt")
        return self._handles[shard]

    def __getitem__(self, index):
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} trajectories")
        index %= len(self)
        f = self._handle(index // self.shard_size)
        row = index % self.shard_size
        state = f.get_slice("state")[row].float()
        label = f.get_slice(self.condition)[row]
        condition = (label,) if self.text is None else self.text[int(label)]
        if self.target == "state":
            return state[:-1], state[1:], *condition
        x0 = f.get_slice("x0")[row].float()
        return torch.cat([state[:1], x0]), torch.cat([x0, state[-1:]]), *condition

    def __getstate__(self):  # handles are not picklable; workers reopen their own
        return {**self.__dict__, "_handles": {}}


if __name__ == "__main__":
    main()
