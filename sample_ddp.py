"""Sample N images from a teacher or an ARD student into ADM's .npz, for FID evaluation.

    torchrun --nproc_per_node=8 sample_ddp.py --ckpt results/000-ard-N6/checkpoints/0300000.pt \\
        --num-fid-samples 50000 --out samples/ard-N6.npz

Image i comes from its own seed (global seed, i) in the evaluation noise stream, which no
training trajectory draws from (utils.NOISE_STREAMS), so the result does not depend on the
number of processes or the batch size and no image is generated from a trajectory's noise. Work is done in chunks of --chunk-size images, each saved
as it completes in OUT.parts; a re-run with the same settings (recorded there in
settings.json) keeps them and makes only the missing ones, and one with other settings stops.
SIGTERM or SIGUSR1 (--stop-signals) stops each rank after the chunk it is making, with exit status 75.

Text-to-image: --prompts FILE with a PixArt student checkpoint or pipeline; image i takes prompt
i mod P (--labels balanced) or a random one, and arr_1 holds the prompt indices, for
`python -m evaluations.clip_score SAMPLES.npz FILE`.
"""
import argparse
import json
import os
import shutil

import numpy as np
import torch

import pixart
from extract_trajectories import check_flow_args
from models import OFFICIAL_CHECKPOINTS
from sample import add_generator_args, checkpoint_from_args, generator_from_args, load_decoder
from utils import (StopRequest, add_distributed_args, autocast, barrier, check_meta, cleanup_distributed,
                   index_noise_and_labels, init_distributed, on_rank_zero, progress, save_json, save_npz, to_uint8)

# Flags that do not change the images: the runs that make one .npz may differ in them.
RUN_CONTROL = ("per_proc_batch_size", "out", "dist_timeout", "device", "stop_signals")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_generator_args(p)
    p.add_argument("--cfg-scale", type=float, default=1.5)
    p.add_argument("--num-fid-samples", type=int, default=50_000)
    p.add_argument("--per-proc-batch-size", type=int, default=32)
    p.add_argument("--chunk-size", type=int, default=1000, help="images per saved unit of work")
    p.add_argument("--global-seed", type=int, default=0)
    p.add_argument("--labels", choices=["uniform", "balanced"], default="uniform")
    p.add_argument("--decode-precision", choices=["bf16", "fp32"], default="fp32",
                   help="the VAE decode on GPU; bf16 autocast saves about half the 4-step student's cost at "
                        "256^2, but a tiny random VAE's uint8 pixels differ from fp32 in 25%% of places (by <= 2), "
                        "so fp32 stays the default until bf16 is measured on SD-VAE")
    p.add_argument("--out", required=True, help="the .npz to write")
    add_distributed_args(p)
    args = p.parse_args(argv)
    if args.cfg_scale < 1:
        p.error(f"--cfg-scale must be >= 1, got {args.cfg_scale}")
    check_flow_args(p, args)
    if not args.out.endswith(".npz"):
        p.error(f"--out must end in .npz, got {args.out}")
    if args.num_fid_samples < 1 or args.per_proc_batch_size < 1 or args.chunk_size < 1:
        p.error("--num-fid-samples, --per-proc-batch-size and --chunk-size must be positive")
    return args


def chunk_path(parts_dir, index):
    return os.path.join(parts_dir, f"chunk_{index:05d}.npz")


def checkpoint_identity(ckpt, hub_names=False):
    """An official name as it is; a file by absolute path, size and modification time, so that
    a file rewritten at the same path counts as another checkpoint; a pipeline folder likewise by the
    files of its transformer/ (the folder's own time misses weights rewritten in place). With `hub_names`
    (PixArt pipelines), a name that is no local path is a hub name, also kept as it is."""
    if ckpt in OFFICIAL_CHECKPOINTS or hub_names and not os.path.exists(ckpt):
        return ckpt
    stats = [os.stat(f) for f in pipeline_weights(ckpt)] or [os.stat(ckpt)]
    return dict(path=os.path.abspath(ckpt), bytes=sum(s.st_size for s in stats),
                modified_ns=max(s.st_mtime_ns for s in stats))


def pipeline_weights(path):
    """The files of a pipeline folder's transformer/ (none for anything else)."""
    transformer = os.path.join(str(path), "transformer")
    return sorted(os.path.join(transformer, f) for f in os.listdir(transformer)) if os.path.isdir(transformer) else []


def parts_settings(args):
    """Everything the images depend on: the flags, with the checkpoint identified by its file."""
    settings = {k: v for k, v in vars(args).items() if k not in RUN_CONTROL}
    prompts = dict(prompts=checkpoint_identity(args.prompts)) if args.prompts else {}
    return dict(settings, ckpt=checkpoint_identity(checkpoint_from_args(args), hub_names=bool(args.prompts)),
                noise_stream="evaluation", **prompts)


def prepare_parts(parts_dir, settings):
    """Creates parts_dir with settings.json, or checks that its chunks were made with `settings`."""
    path = os.path.join(parts_dir, "settings.json")
    if os.path.exists(path):
        with open(path) as f:
            check_meta(json.load(f), settings, f"{path} (its chunks were made with other settings: "
                                               f"use another --out, or remove {parts_dir})")
        return
    os.makedirs(parts_dir, exist_ok=True)
    if any(name.startswith("chunk_") for name in os.listdir(parts_dir)):
        raise ValueError(f"{parts_dir} holds chunks but no settings.json: their settings are unknown; "
                         f"use another --out, or remove {parts_dir}")
    save_json(settings, path)


@torch.no_grad()
def main(argv=None):
    args = parse_args(argv)
    rank, world_size, device = init_distributed(args.dist_timeout, args.device)
    parts_dir = args.out[: -len(".npz")] + ".parts"
    on_rank_zero(rank, lambda: prepare_parts(parts_dir, parts_settings(args)))
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    prompts = pixart.read_prompts(args.prompts) if args.prompts else None
    generate, network, info = generator_from_args(args, device, text_to_image=bool(prompts))
    network.to(device)
    autoencoder = load_decoder(info).to(device)
    if prompts:
        shape, num_conditions = info["shape"], len(prompts)
    else:
        dit = info["dit"]
        shape, num_conditions = (dit["in_channels"], dit["input_size"], dit["input_size"]), dit["num_classes"]
    bf16 = autocast(device, args.precision)

    num_chunks = -(-args.num_fid_samples // args.chunk_size)
    missing = [c for c in range(num_chunks) if not os.path.exists(chunk_path(parts_dir, c))]
    barrier()  # every rank has listed the chunks before any is written
    def chunk_indices(chunk):
        return range(chunk * args.chunk_size, min((chunk + 1) * args.chunk_size, args.num_fid_samples))

    bar = progress(sum(len(chunk_indices(c)) for c in missing), "sampling", "img", enabled=rank == 0)
    stop = StopRequest(args.stop_signals)
    for j, chunk in enumerate(missing[rank::world_size]):
        if stop.received:
            break
        indices = chunk_indices(chunk)
        images, labels = [], []
        for start in range(indices.start, indices.stop, args.per_proc_batch_size):
            batch = range(start, min(start + args.per_proc_batch_size, indices.stop))
            noise, y = index_noise_and_labels(args.global_seed, batch, shape, num_conditions, args.labels,
                                              stream="evaluation")
            with bf16:
                samples = generate(noise.to(device), [prompts[i] for i in y] if prompts else y.to(device))
            with autocast(device, args.decode_precision):
                decoded = autoencoder.decode(samples.float())
            images.append(to_uint8(decoded.clamp(-1, 1)))
            labels.append(y.numpy())
            bar.update(len(batch) * min(world_size, len(missing) - j * world_size))  # all ranks' progress
        arrays = dict(arr_0=np.concatenate(images), arr_1=np.concatenate(labels))
        save_npz(chunk_path(parts_dir, chunk), arrays)
    bar.close()
    stop.exit_if_received(f"every chunk this rank finished is in {parts_dir}")
    barrier()
    if rank == 0:
        chunks = [np.load(chunk_path(parts_dir, c)) for c in range(num_chunks)]
        arrays = {key: np.concatenate([c[key] for c in chunks]) for key in ("arr_0", "arr_1")}
        save_npz(args.out, arrays)
        shutil.rmtree(parts_dir)
        print(f"{info['kind']} ({info['num_steps']} steps): {arrays['arr_0'].shape[0]} images of "
              f"{arrays['arr_0'].shape[1:]} in {args.out}")
    cleanup_distributed()


if __name__ == "__main__":
    main()
