"""Solve the teacher's probability-flow ODE from seeded noise and keep the points the student learns.

    torchrun --nproc_per_node=8 extract_trajectories.py --ckpt DiT-XL-2-256x256.pt \\
        --out trajectories/imagenet256 --num-samples 1200000

Per sample: the noise x_T, the ODE state and the teacher's x0-prediction at the K-1
intermediate student boundaries, and the final sample. The output directory holds meta.json
and fixed-size safetensors shards; shard i depends only on (seed, i), so the bytes do not
depend on the number of processes, and a re-run skips the shards already complete.
"""
import argparse
import json
import os
import shutil
from concurrent.futures import ThreadPoolExecutor

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch.utils.data import Dataset
from tqdm import tqdm

from diffusion import create_diffusion, student_timesteps
from models import load_teacher, with_guidance
from utils import (add_distributed_args, atomic_write, autocast, barrier, check_meta, cleanup_distributed,
                   index_noise_and_labels, index_seed, init_distributed, on_rank_zero, save_json)

FORMAT_VERSION = 3  # 2: meta.json records teacher_weights_sha256; 3: and clip_denoised (pixel space)
TARGETS = ("state", "x0")


def shard_path(directory, index):
    return os.path.join(directory, f"shard_{index:05d}.safetensors")


def shard_shapes(meta):
    """The tensors of one shard and their shapes."""
    K, shape, n = meta["num_steps"], tuple(meta["shape"]), meta["shard_size"]
    return {"state": (n, K + 1, *shape), "x0": (n, K - 1, *shape), "labels": (n,), "seeds": (n,)}


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
    return meta["shard_size"] * ((2 * meta["num_steps"]) * point + 2 * 8)  # K+1 states, K-1 x0, label, seed


def build_meta(args, teacher_info):
    steps, times = student_timesteps(args.num_steps, args.teacher_steps)
    dit = teacher_info["dit"]
    return dict(
        format=FORMAT_VERSION, teacher_ckpt=teacher_info["ckpt"], teacher_weights_sha256=teacher_info["weights_sha256"],
        dit=dit, image_size=teacher_info["image_size"], vae=teacher_info["vae"],
        shape=[dit["in_channels"], dit["input_size"], dit["input_size"]],
        solver="ddim", eta=0.0, clip_denoised=teacher_info["vae"] == "none", teacher_steps=args.teacher_steps, cfg_scale=args.cfg_scale,
        guidance_channels=args.guidance_channels, num_steps=args.num_steps, boundary_steps=steps,
        boundary_times=times, dtype="float16", precision=args.precision, seed=args.seed, labels=args.labels,
        num_classes=dit["num_classes"], num_samples=args.num_samples, shard_size=args.shard_size,
        points={"state": "(n, K+1, C, H, W): x_T, the ODE state at boundary_times[1:], the final sample",
                "x0": "(n, K-1, C, H, W): the teacher's x0-prediction at boundary_times[1:]",
                "labels": "(n,) class labels", "seeds": "(n,) the seed of each sample's noise"})


@torch.no_grad()
def solve_trajectories(model_fn, diffusion, noise, labels, meta):
    """(states (n, K+1, ...), x0 (n, K-1, ...)) of DDIM solves; `model_fn` is the guided teacher
    and `noise`/`labels` its (possibly doubled) batch, whose first n rows are kept."""
    n = noise.shape[0] // (2 if meta["cfg_scale"] > 1 else 1)
    boundaries = meta["boundary_steps"][1:]
    states, x0, x = [noise[:n]], [], noise
    for step, out in enumerate(diffusion.ddim_sample_loop_progressive(
            model_fn, noise.shape, noise, clip_denoised=meta["clip_denoised"], model_kwargs=dict(y=labels))):
        if step in boundaries:
            states.append(x[:n])
            x0.append(out["pred_xstart"][:n])
        x = out["sample"]
    states.append(x[:n])
    return torch.stack(states, dim=1), torch.stack(x0, dim=1)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True, help="official DiT name (DiT-XL-2-256x256.pt) or a teacher checkpoint")
    p.add_argument("--model", default="DiT-XL/2", help="architecture of an official/bare checkpoint")
    p.add_argument("--image-size", type=int, default=256)
    p.add_argument("--vae", default="ema", help="the VAE an official checkpoint works with (ema, mse, none)")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--num-samples", type=int, default=1_200_000)
    p.add_argument("--shard-size", type=int, default=1000)
    p.add_argument("--batch-size", type=int, default=250,
                   help="samples per teacher forward (doubled by CFG); on GPUs the last bits may depend on it")
    p.add_argument("--num-steps", type=int, default=4, help="student steps K")
    p.add_argument("--teacher-steps", type=int, default=25)
    p.add_argument("--cfg-scale", type=float, default=1.5)
    p.add_argument("--guidance-channels", type=int, default=3, help="guide the first C eps channels (DiT: 3)")
    p.add_argument("--labels", choices=["balanced", "uniform"], default="balanced")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--precision", choices=["bf16", "fp32"], default="bf16", help="teacher forward on GPU")
    p.add_argument("--compile", action="store_true", help="torch.compile the teacher")
    add_distributed_args(p)
    args = p.parse_args(argv)
    if min(args.num_samples, args.shard_size, args.batch_size) < 1:
        p.error("--num-samples, --shard-size and --batch-size must be positive")
    if args.num_samples % args.shard_size:
        p.error(f"--num-samples {args.num_samples} must be a multiple of --shard-size {args.shard_size}")
    if args.cfg_scale < 1:
        p.error(f"--cfg-scale must be >= 1, got {args.cfg_scale}")
    return args


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


def main(argv=None):
    args = parse_args(argv)
    rank, world_size, device = init_distributed(args.dist_timeout)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    model, teacher_info = load_teacher(args.ckpt, args.model, args.image_size, args.vae)
    meta = build_meta(args, teacher_info)
    os.makedirs(args.out, exist_ok=True)
    missing = missing_shards(args.out, meta)  # listed by every rank before any shard is written
    on_rank_zero(rank, lambda: prepare_output(args, meta, missing))
    model = model.to(device)
    if args.compile:
        model.forward = torch.compile(model.forward)  # forward_with_cfg calls it too
    diffusion = create_diffusion(str(args.teacher_steps))
    bf16 = autocast(device, args.precision)

    def solve(noise, labels):
        guided, noise, labels = with_guidance(model, noise.to(device), labels.to(device), args.cfg_scale,
                                              args.guidance_channels)
        def model_fn(x, t, y):
            with bf16:
                return guided(x, t, y).float()
        return solve_trajectories(model_fn, diffusion, noise, labels, meta)

    mine = list(missing)[rank::world_size]
    bar = tqdm(total=len(missing) * args.shard_size, unit="traj", disable=rank != 0, smoothing=0.1)
    with ThreadPoolExecutor(max_workers=1) as writer:  # writes overlap with the next shard's solve
        pending = None
        for j, shard in enumerate(mine):
            indices = range(shard * args.shard_size, (shard + 1) * args.shard_size)
            noise, labels = index_noise_and_labels(args.seed, indices, meta["shape"], meta["num_classes"], args.labels)
            parts = [solve(noise[i:i + args.batch_size], labels[i:i + args.batch_size])
                     for i in range(0, len(indices), args.batch_size)]
            tensors = {"state": torch.cat([s for s, _ in parts]).half().cpu(),
                       "x0": torch.cat([x for _, x in parts]).half().cpu(),
                       "labels": labels, "seeds": torch.tensor([index_seed(args.seed, i) for i in indices])}
            if pending is not None:
                pending.result()
            path = shard_path(args.out, shard)
            pending = writer.submit(atomic_write, path, lambda tmp, t=tensors: save_file(t, tmp))
            bar.update(args.shard_size * min(world_size, len(missing) - j * world_size))  # all ranks' shards
        if pending is not None:
            pending.result()
    bar.close()
    barrier()
    if rank == 0:
        print(f"trajectories in {args.out}")
    cleanup_distributed()


class TrajectoryDataset(Dataset):
    """Stage inputs, targets and label of each stored trajectory, read lazily from the shards.

    target "state": inputs [x_T, x_τ1, ..., x_τ(K-1)], targets [x_τ1, ..., x_τ(K-1), x_0];
    target "x0": the intermediate points are the teacher's x0-predictions at τ_1..τ_(K-1).
    `expected` holds meta fields the student relies on (K, boundary times, shape, teacher);
    a mismatch stops here with the differing field.
    """

    def __init__(self, directory, target="state", expected=None):
        if target not in TARGETS:
            raise ValueError(f"target must be one of {TARGETS}, got {target!r}")
        meta_path = os.path.join(directory, "meta.json")
        if not os.path.isfile(meta_path):
            raise FileNotFoundError(f"no trajectories at {directory} (missing {meta_path})")
        with open(meta_path) as f:
            self.meta = json.load(f)
        check_meta(self.meta, expected or {}, meta_path)
        self.directory, self.target = directory, target
        self.shard_size = self.meta["shard_size"]
        self.num_shards = self.meta["num_samples"] // self.shard_size
        for i in range(self.num_shards):
            check_shard(shard_path(directory, i), shard_shapes(self.meta))
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
        label = f.get_slice("labels")[row]
        if self.target == "state":
            return state[:-1], state[1:], label
        x0 = f.get_slice("x0")[row].float()
        return torch.cat([state[:1], x0]), torch.cat([x0, state[-1:]]), label

    def __getstate__(self):  # handles are not picklable; workers reopen their own
        return {**self.__dict__, "_handles": {}}


if __name__ == "__main__":
    main()
