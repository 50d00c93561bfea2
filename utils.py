"""Small pieces shared by the scripts: distributed set-up, per-index randomness, atomic writes."""
import argparse
import contextlib
import datetime
import hashlib
import json
import os
import signal
import sys
import time

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image
from torchvision.utils import make_grid
from tqdm import tqdm

UMASK = os.umask(0)
os.umask(UMASK)
# The exit status of a run stopped by a signal after saving its work: EX_TEMPFAIL of sysexits.h ("try again
# later"), for a job script to requeue on. Any other non-zero status is a failure.
REQUEUE_EXIT_CODE = 75


def add_distributed_args(parser):
    """The flags of every torchrun script."""
    parser.add_argument("--dist-timeout", type=float, default=60,
                        help="minutes a rank waits for the others (e.g. for the slowest rank's share of a checkpoint) "
                             "before the job fails; NCCL's own default is 10")
    parser.add_argument("--device", choices=["cuda", "cpu"], default=None,
                        help="default: cuda under torchrun (stopping when it is unavailable), else cuda if available; "
                             "cpu runs torchrun's processes on the CPU with gloo")
    parser.add_argument("--stop-signals", default="TERM,USR1", type=signal_names,
                        help="signals (comma-separated, without SIG; 'none' for none) that stop every rank at the next "
                             f"boundary of its work, keeping all done so far, with exit status {REQUEUE_EXIT_CODE}: "
                             "a scheduler's preemption or time limit (SLURM's --signal, torchrun forwards TERM)")


def check_cuda():
    """Stops with one line naming why CUDA is unavailable (no driver, a driver too old for this build, ...)."""
    if torch.cuda.is_available():
        return
    try:
        torch.cuda.init()
        cause = f"no visible device (CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r})"
    except Exception as e:  # torch's own reason: its message names the driver or the build
        cause = str(e).strip().splitlines()[0].rstrip(".")
    raise SystemExit(f"CUDA is unavailable to torch {torch.__version__} (CUDA {torch.version.cuda}): {cause}; "
                     f"pass --device cpu to run on the CPU")


def init_distributed(timeout_minutes, device=None):
    """(rank, world_size, device). Under torchrun: NCCL on GPUs (unless device is "cpu": gloo), stopping
    when CUDA is unavailable rather than falling back to the CPU; plainly: one process, on `device` or
    the GPU if there is one. A collective that waits longer than `timeout_minutes` fails the job."""
    if device == "cuda" or device is None and "RANK" in os.environ:
        check_cuda()
    if "RANK" not in os.environ:
        return 0, 1, torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    backend = "gloo" if device == "cpu" else "nccl"
    timeout = datetime.timedelta(minutes=timeout_minutes)
    store, rank, world_size = next(dist.rendezvous("env://", timeout=timeout))
    dist.init_process_group(backend, store=dist.PrefixStore(f"join{join_count(store, rank)}/", store), rank=rank,
                            world_size=world_size, timeout=timeout)
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    else:
        device = torch.device("cpu")
    return dist.get_rank(), dist.get_world_size(), device


def join_count(store, rank):
    """How many times a process has joined as `rank` through `store` (1 for the first).

    torchrun's agents keep their store across restarts, so a restarted group must not read the keys
    the previous group left (each rank's address, NCCL's unique id): it would wait for peers that are
    gone or connect to them. Every round joins each rank once, so the count names the round alike on
    every rank, also when one node's agent was relaunched (its restart count starts again at 0)."""
    return store.add(f"ard/joins/rank{rank}", 1)


def signal_names(text):
    """--stop-signals: 'TERM,USR1' -> ['SIGTERM', 'SIGUSR1'] ('none' -> [])."""
    names = [] if text.strip().lower() == "none" else [f"SIG{n.strip().upper().removeprefix('SIG')}"
                                                      for n in text.split(",")]
    unknown = [n for n in names if not isinstance(getattr(signal, n, None), signal.Signals)]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown signal {unknown[0]}")
    return names


class StopRequest:
    """Remembers that one of `signals` arrived, so that a loop stops at the next boundary of its work
    instead of dying in the middle of it."""

    def __init__(self, signals):
        self.received = None
        for name in signals:
            signal.signal(getattr(signal, name), self.handle)
        # The ranks agree on the CPU: a flag on the GPU would make every step wait for the GPU to finish the last.
        self.group = dist.new_group(backend="gloo") if dist.is_initialized() and dist.get_backend() != "gloo" else None

    def handle(self, signum, frame):
        self.received = signal.Signals(signum).name

    def agreed(self):
        """Whether any rank received a stop signal (a collective: every rank calls it at the same point)."""
        flag = torch.tensor([float(self.received is not None)])
        if dist.is_initialized():
            dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.group)
        return bool(flag.item())

    def exit_if_agreed(self, kept):
        """Ends every rank with REQUEUE_EXIT_CODE, saying what is `kept`, if a stop signal reached any rank (a
        collective: every rank calls it once its own units of work are done or it stopped taking new ones, so a
        rank that finished first and waits here, where its handler cannot run, still learns of the others')."""
        if self.agreed():
            print(f"stopped by {self.received or 'a signal to another rank'}: {kept}; the same command continues "
                  f"(exit status {REQUEUE_EXIT_CODE})", flush=True)
            cleanup_distributed()
            raise SystemExit(REQUEUE_EXIT_CODE)


def autocast(device, precision):
    """bf16 autocast on CUDA when precision is "bf16"; a no-op elsewhere."""
    if device.type == "cuda" and precision == "bf16":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def allow_tf32(allowed):
    """Lets CUDA's fp32 matmuls and convolutions round their inputs to TF32 (10 mantissa bits), or keeps them IEEE
    fp32 (torch lets cuDNN's convolutions use TF32 by default, so IEEE fp32 must be asked for)."""
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = allowed


class LineProgress:
    """Progress for a log file: one plain line every `every` seconds and one at the end (tqdm's
    carriage-return redraws would fill the file)."""

    def __init__(self, total, desc, unit, every, initial=0, stream=None):
        self.total, self.desc, self.unit, self.every, self.n, self.initial = total, desc, unit, every, initial, initial
        self.stream = stream or sys.stdout
        self.start = self.last = time.time()

    def update(self, n=1):
        self.n += n
        if time.time() - self.last >= self.every:
            self.report()

    def report(self):
        self.last = time.time()
        rate = (self.n - self.initial) / max(self.last - self.start, 1e-9)
        left = f", {(self.total - self.n) / rate / 60:.1f} min left" if rate > 0 and self.n < self.total else ""
        print(f"{self.desc}: {self.n}/{self.total} {self.unit} ({100 * self.n / max(self.total, 1):.0f}%), "
              f"{rate:.3g} {self.unit}/s{left}", file=self.stream, flush=True)

    def close(self):
        self.report()


def progress(total, desc, unit, enabled=True, initial=0, lines=True, every=60.0):
    """A tqdm bar when stderr (where it draws) is a terminal; otherwise, with `lines`, a LineProgress
    on stdout, and nothing without (a caller whose log lines say how far it is)."""
    if enabled and sys.stderr.isatty():
        return tqdm(total=total, desc=desc, unit=unit, initial=initial, dynamic_ncols=True)
    if enabled and lines:
        return LineProgress(total, desc, unit, every, initial)
    return tqdm(total=total, disable=True)


def barrier():
    if dist.is_initialized():
        dist.barrier()


def on_rank_zero(rank, work, group=None):
    """work() on rank 0 only; its result, or the error it raised, reaches every rank (of `group`, default: all).
    The other ranks then raise rank 0's error at once instead of waiting in a collective that rank 0 never
    reaches (a hang until the timeout under NCCL)."""
    result, error = None, None
    if rank == 0:
        try:
            result = work()
        except Exception as e:  # raised below, on every rank
            error = e
    if dist.is_initialized():
        shared = [result, error]
        dist.broadcast_object_list(shared, group=group)
        result, error = shared
    if error is not None:
        raise error
    return result


def on_every_rank(work):
    """work() on every rank; when any rank raised, every rank raises the first rank's error (rather than the
    others waiting for it in the next collective)."""
    error = None
    try:
        work()
    except Exception as e:  # raised below, on every rank
        error = e
    if dist.is_initialized():
        errors = [None] * dist.get_world_size()
        dist.all_gather_object(errors, error)
        error = next((e for e in errors if e is not None), None)
    if error is not None:
        raise error


def in_download_turns(work):
    """work() on every rank in three turns: the global rank 0, then each other node's first rank, then the rest,
    each turn waiting for the one before. A work() that fetches a missing file then finds it fetched by rank 0 when
    the file's folder is shared by all nodes, or by its node's first rank when it is node-local: one download per
    folder. Every rank raises the first error of a turn (rank 0 offline: its one-line error, on every rank)."""
    if not dist.is_initialized():
        return work()
    rank = dist.get_rank()
    mine = 0 if rank == 0 else 1 if int(os.environ.get("LOCAL_RANK", rank)) == 0 else 2
    result = []
    for turn in range(3):
        on_every_rank(lambda: result.append(work()) if turn == mine else None)
    return result[0]


def cleanup_distributed():
    if dist.is_initialized():
        dist.destroy_process_group()


def index_seed(seed, index):
    """The seed of item `index` of a run seeded with `seed`: results never depend on how items
    are spread over processes and batches. (Seeds go through numpy's SeedSequence, which uses
    all 64 bits; torch's CPU generator would keep only the low 32.)"""
    if not 0 <= seed < 2 ** 31:
        raise ValueError(f"seed must be in [0, 2**31), got {seed}")
    return seed * 2 ** 32 + index


# Where noise comes from: the teacher trajectories students train on, or the evaluation (samples for
# metrics, held-out trajectories). Evaluation noise is the child stream spawn_key (1,) of the same
# SeedSequence: numpy's independent streams, so no evaluation draw equals a training trajectory's noise,
# whatever the seeds of either.
NOISE_STREAMS = {"trajectories": (), "evaluation": (1,)}


def index_noise_and_labels(seed, indices, shape, num_classes, labels="uniform", stream="trajectories"):
    """Gaussian noise (len(indices), *shape) and class labels, each item from its own generator.

    labels: "uniform" (random, drawn after the item's noise) or "balanced" (index mod classes);
    stream: a key of NOISE_STREAMS.
    """
    if stream not in NOISE_STREAMS:
        raise ValueError(f"noise stream must be one of {', '.join(NOISE_STREAMS)}, got {stream!r}")
    noise, drawn = [], []
    for i in indices:
        rng = np.random.default_rng(np.random.SeedSequence(index_seed(seed, i), spawn_key=NOISE_STREAMS[stream]))
        noise.append(torch.from_numpy(rng.standard_normal(shape, dtype=np.float32)))
        drawn.append(int(rng.integers(num_classes)) if labels == "uniform" else i % num_classes)
    return torch.stack(noise), torch.tensor(drawn, dtype=torch.long)


def fsync_path(path):
    """Flushes a file's data, or a directory's entries, to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path, write):
    """Calls write(tmp_path) and renames the result to `path`: readers never see a partial file,
    and after a crash, of the process or the machine, `path` holds the old file or the new one."""
    tmp = f"{path}.tmp"
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~UMASK)  # some writers (safetensors) create private files
        fsync_path(tmp)  # the data on disk before a name points at them
        os.replace(tmp, path)
        fsync_path(os.path.dirname(os.path.abspath(path)))  # the rename on disk
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def sha256_of(path):
    """The hex sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def check_meta(meta, expected, source, prefix=""):
    """Raises on the first field of `meta` that differs from `expected` (nested dicts by field)."""
    for key, value in json.loads(json.dumps(expected)).items():  # tuples compare as the lists JSON stores
        found = meta.get(key) if isinstance(meta, dict) else None
        if isinstance(value, dict) and isinstance(found, dict):
            check_meta(found, value, source, f"{prefix}{key}.")
        elif found != value:
            raise ValueError(f"{source}: {prefix}{key} is {found!r}, expected {value!r}")


def save_json(obj, path):
    def write(tmp):
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=2)
    atomic_write(path, write)


def save_npz(path, arrays):
    def write(tmp):
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)
    atomic_write(path, write)


def to_uint8(images):
    """Images in [-1, 1], (B, C, H, W) -> uint8 (B, H, W, 3); single-channel images are replicated."""
    images = ((images.float() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
    if images.shape[1] == 1:
        images = images.expand(-1, 3, -1, -1)
    return images.permute(0, 2, 3, 1).cpu().numpy()


def save_grid(images, path, nrow=8, scale=1):
    """Writes images in [-1, 1], (B, C, H, W), as one PNG grid; `scale` enlarges small images."""
    grid = make_grid(images.detach().float().cpu(), nrow=nrow, normalize=True, value_range=(-1, 1), padding=2)
    picture = Image.fromarray(grid.mul(255).add(0.5).clamp(0, 255).permute(1, 2, 0).to(torch.uint8).numpy())
    if scale > 1:
        picture = picture.resize((picture.width * scale, picture.height * scale), Image.NEAREST)
    atomic_write(path, lambda tmp: picture.save(tmp, format="PNG"))
