"""Sample N images from a teacher or an ARD student into ADM's .npz, for FID evaluation.

    torchrun --nproc_per_node=8 sample_ddp.py --ckpt results/000-ard-N6/checkpoints/0300000 \\
        --num-fid-samples 50000 --out samples/ard-N6.npz

Image i comes from its own seed (global seed, i) in the evaluation noise stream, which no
training trajectory draws from (utils.NOISE_STREAMS), so the result does not depend on the
number of processes or the batch size and no image is generated from a trajectory's noise. Work is done in
chunks of --chunk-size images, each saved as it completes in OUT.parts; a re-run with the same settings
(recorded there in settings.json) keeps them and makes only the missing ones, and one with other settings stops.
The chunks then stream into OUT (arr_0 images, arr_1 labels, and `settings`: the run's settings as JSON in a
0-d string, what makes two sample sets pairable) and OUT.parts is removed; a re-run after OUT is complete does
nothing, and stops when OUT holds the images of other settings.
SIGTERM or SIGUSR1 (--stop-signals) stops each rank after the chunk it is making, with exit status 75.

Text-to-image: --prompts FILE with a PixArt student checkpoint or pipeline; image i takes prompt
i mod P (--labels balanced) or a random one, and arr_1 holds the prompt indices, for
`python -m evaluations.clip_score SAMPLES.npz FILE`.
"""
import argparse
import json
import os
import shutil
import warnings
import zipfile

import numpy as np
import torch

import pixart
from evaluations.npz import NpzImages
from extract_trajectories import check_flow_args, check_pixart_sources
from models import OFFICIAL_CHECKPOINTS, is_sharded_checkpoint
from sample import add_generator_args, checkpoint_from_args, generator_from_args, load_decoder
from utils import (StopRequest, add_distributed_args, allow_tf32, atomic_write, autocast, barrier, check_meta,
                   cleanup_distributed, index_noise_and_labels, init_distributed, on_rank_zero, progress, save_json,
                   save_npz, to_uint8)

# Flags that do not change the images: the runs that make one .npz may differ in them.
RUN_CONTROL = ("per_proc_batch_size", "out", "dist_timeout", "device", "stop_signals")
PIECE_BYTES = 2 ** 24  # the last step copies the chunks' images into the .npz this much at a time


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
    check_pixart_sources(p, args, text_to_image=bool(args.prompts))
    if not args.out.endswith(".npz"):
        p.error(f"--out must end in .npz, got {args.out}")
    if args.num_fid_samples < 1 or args.per_proc_batch_size < 1 or args.chunk_size < 1:
        p.error("--num-fid-samples, --per-proc-batch-size and --chunk-size must be positive")
    return args


def chunk_path(parts_dir, index):
    return os.path.join(parts_dir, f"chunk_{index:05d}.npz")


def checkpoint_identity(ckpt, hub_names=False):
    """An official name as it is; a file by absolute path, size and modification time, so that
    a file rewritten at the same path counts as another checkpoint; a pipeline folder or a sharded checkpoint
    likewise by the files of its weights (the folder's own time misses weights rewritten in place). With
    `hub_names` (PixArt pipelines), a name that is no local path is a hub name, also kept as it is."""
    if ckpt in OFFICIAL_CHECKPOINTS or hub_names and not os.path.exists(ckpt):
        return ckpt
    stats = [os.stat(f) for f in folder_weights(ckpt)] or [os.stat(ckpt)]
    return dict(path=os.path.abspath(ckpt), bytes=sum(s.st_size for s in stats),
                modified_ns=max(s.st_mtime_ns for s in stats))


def folder_weights(path):
    """The files of a sharded checkpoint, or of a pipeline folder's transformer/ (none for anything else)."""
    folder = str(path) if is_sharded_checkpoint(path) else os.path.join(str(path), "transformer")
    return sorted(os.path.join(folder, f) for f in os.listdir(folder)) if os.path.isdir(folder) else []


def parts_settings(args):
    """Everything the images depend on: the flags, with the checkpoint identified by its file."""
    settings = {k: v for k, v in vars(args).items() if k not in RUN_CONTROL}
    prompts = dict(prompts=checkpoint_identity(args.prompts)) if args.prompts else {}
    return dict(settings, ckpt=checkpoint_identity(checkpoint_from_args(args), hub_names=bool(args.prompts)),
                noise_stream="evaluation", **prompts)


def prepare_run(args, parts_dir):
    """Rank 0's first step: the settings of the images to make, with parts_dir ready for their chunks, or None
    when args.out holds those images already (it says so, and removes what a failed clean-up left)."""
    settings = parts_settings(args)
    if not os.path.exists(args.out):
        prepare_parts(parts_dir, settings)
        return settings
    recorded = recorded_settings(args.out)
    if recorded is None:
        raise ValueError(f"{args.out} exists and records no settings, so its images cannot be checked against this "
                         f"run's: use another --out, or remove it")
    check_meta(recorded, settings, f"{args.out} (its images were made with other settings: use another --out, "
                                   f"or remove it)")
    print(f"{args.out} holds the {settings['num_fid_samples']} images of these settings already: nothing to do")
    remove_parts(parts_dir)
    return None


def recorded_settings(path):
    """The settings an .npz of sample_ddp.py records (None for an .npz without them)."""
    with np.load(path, allow_pickle=False) as f:
        return json.loads(f["settings"].item()) if "settings" in f.files else None


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


def write_samples(out, chunks, settings):
    """Writes `out` atomically, as np.savez does, from chunks [(path, number of images)]: arr_0 their images in
    order, arr_1 their labels, and `settings` as JSON in a 0-d string. The images stream through in pieces of
    about PIECE_BYTES, never a whole chunk or set; every file is closed when this returns. The images' shape."""
    images = [NpzImages(path) for path, _ in chunks]  # each checked as uint8 N x H x W x 3 from its header
    shape = images[0].shape[1:]
    for (path, count), found in zip(chunks, images):
        if found.shape != (count, *shape):
            raise ValueError(f"{path} holds images of shape {found.shape}, expected {(count, *shape)}: remove it "
                             f"and run the same command again")
    labels = []
    for path, _ in chunks:
        with np.load(path) as f:
            labels.append(f["arr_1"])
    total = (sum(count for _, count in chunks), *shape)

    def write(tmp):
        with zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED, allowZip64=True) as archive:
            with archive.open("arr_0.npy", "w", force_zip64=True) as f:
                np.lib.format.write_array_header_1_0(f, dict(descr="|u1", fortran_order=False, shape=total))
                for chunk in images:
                    for piece in chunk.batches(max(1, PIECE_BYTES // int(np.prod(shape)))):
                        f.write(piece.data)
            for name, array in (("arr_1", np.concatenate(labels)), ("settings", np.array(json.dumps(settings)))):
                with archive.open(f"{name}.npy", "w", force_zip64=True) as f:
                    np.lib.format.write_array(f, array, allow_pickle=False)
    atomic_write(out, write)
    return total


def remove_parts(parts_dir):
    """Removes the chunks' folder, if any. Failing to (on NFS, a file that some process still holds open stays
    as .nfsXXXX) is only a warning: the samples are complete."""
    if not os.path.exists(parts_dir):
        return
    try:
        shutil.rmtree(parts_dir)
    except OSError as e:
        warnings.warn(f"could not remove {parts_dir} ({e}); the samples are complete: remove it by hand")


@torch.no_grad()
def main(argv=None):
    args = parse_args(argv)
    rank, world_size, device = init_distributed(args.dist_timeout, args.device)
    stop = StopRequest(args.stop_signals)  # before loading: a signal during start-up stops at the first chunk
    parts_dir = args.out[: -len(".npz")] + ".parts"
    settings = on_rank_zero(rank, lambda: prepare_run(args, parts_dir))
    if settings is None:
        cleanup_distributed()
        return
    allow_tf32(False)  # fp32 is IEEE fp32 (--precision, --decode-precision); bf16 runs under autocast either way
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
    stop.exit_if_agreed(f"every chunk this rank finished is in {parts_dir}")
    barrier()
    if rank == 0:
        chunks = [(chunk_path(parts_dir, c), len(chunk_indices(c))) for c in range(num_chunks)]
        written = write_samples(args.out, chunks, settings)
        remove_parts(parts_dir)
        print(f"{info['kind']} ({info['num_steps']} steps): {written[0]} images of {written[1:]} in {args.out}")
    cleanup_distributed()


if __name__ == "__main__":
    main()
