"""Speed and cost of the teacher, step distillation (N=0) and ARD, side by side.

    python benchmark.py                                     # DiT-XL/2 256², K=4, N=6, bf16, on a GPU
    python benchmark.py --compile                           # the same with torch.compile
    python benchmark.py --compile --attention flex          # FlexAttention block mask in the history blocks
    python benchmark.py --model DiT-S/2 --depth 2 --hidden-size 64 --num-heads 2 --image-size 64 \
        --train-batch 2 --sample-batches 1 2 --extract-batch 2 --teacher-steps 4 --device cpu --precision fp32

Prints one table, each row as soon as it is measured: GFLOPs per image (DiT's
multiply-accumulate convention), training samples/s with model-FLOPs utilisation and peak
memory, K-step sampling latency for 1 and 32 images, and the teacher's trajectory-extraction
rate against its bare forward rate.
Weights are random: speed does not depend on them.

    python benchmark.py --model DiT-XL/2 --patch-size 1 --in-channels 32 --downsampling 16 --arch lightningdit
    python benchmark.py --model DiT-XL/2 --patch-size 1 --in-channels 32 --downsampling 16 --no-learned-sigma

the same for LightningDiT-XL/1 and REPA-E's SiT-XL/1 on VA-VAE latents (256 tokens at 256², as DiT-XL/2's).

    python benchmark.py --gan       # the adversarial stage: GFLOPs of one R+D step, part by part (no weights)

counts, on a weightless (meta-device) DiT-XL/2, ARD student and SD-VAE, what one R+D step spends on the
generator, on the discriminator and on encoding the real images (what pre-encoding them would save).

    python benchmark.py --pixart    # text-to-image: PixArt-Sigma at 512 and 1024, GFLOPs only (no weights)

prints the GFLOPs of a 4-step student (N=0 and N=6) against the teacher's 20-step CFG solve,
counted from the architecture of a weightless (meta-device) PixArt-Sigma-XL/2.

    python benchmark.py --checkpoint --depth 11      # one training checkpoint, 2 gloo processes on the CPU

writes the training state of the --model DiT (model, EMA, AdamW; DiT-XL/2 at depth 11: 4.2 GB) from 2 gloo
processes, as train.py did (rank 0 alone with torch.save, the other rank waiting) and as it does (every rank its
share, in the background), and prints for each rank the seconds it is blocked and the bytes it writes.
"""
import argparse
import copy
import glob
import os
import socket
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.utils.flop_counter import FlopCounterMode

import pixart
from ard import ARD, distillation_loss, gflops
from diffusion import create_diffusion, student_timesteps
from extract_trajectories import solve_trajectories
from gan import Discriminator, adaptive_weight, discriminator_hinge_loss, generator_hinge_loss
from models import Autoencoder, build_network, create_dit, with_guidance
from train import checkpoint_group, save_checkpoint
from utils import atomic_write, autocast, on_rank_zero


def timed(fn, repeats, device):
    """Median seconds of fn() over `repeats` runs, after one warm-up run."""
    fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def peak_memory_gb(device):
    return torch.cuda.max_memory_allocated(device) / 2 ** 30 if device.type == "cuda" else float("nan")


def reset_peak(device):
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def training_rate(model, batch, args, device, bf16):
    """Samples/s of forward + backward + AdamW on random teacher-forced stages."""
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    K, C, H = model.num_steps, model.in_channels, model.input_size
    stages = torch.randn(batch, K, C, H, H, device=device)
    targets, y = torch.randn_like(stages), torch.randint(0, 1000, (batch,), device=device)
    forward = torch.compile(model) if args.compile else model

    def step():
        with bf16:
            loss = distillation_loss(forward(stages, y), targets)[0]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    reset_peak(device)
    seconds = timed(step, args.repeats, device)
    return batch / seconds, peak_memory_gb(device)


def sampling_ms(model, batch, args, device, bf16):
    model.eval()
    noise = torch.randn(batch, model.in_channels, model.input_size, model.input_size, device=device)
    y = torch.randint(0, 1000, (batch,), device=device)
    sample = torch.compile(model.sample, mode="reduce-overhead") if args.compile else model.sample

    def run():
        with bf16:
            sample(noise, y)
    return 1000 * timed(run, args.repeats, device)


def extraction_rates(teacher, batch, args, device, bf16):
    """(trajectories/s of the DDIM+CFG solve, the same rate implied by bare teacher forwards)."""
    teacher.eval()
    if args.compile:
        teacher.forward = torch.compile(teacher.forward)  # as extract_trajectories.py --compile does
    S = args.teacher_steps
    steps, _ = student_timesteps(args.num_steps, S)
    meta = dict(cfg_scale=1.5, boundary_steps=steps, clip_denoised=False)
    diffusion = create_diffusion(str(S))
    noise = torch.randn(batch, teacher.in_channels, teacher.config["input_size"], teacher.config["input_size"],
                        device=device)
    y = torch.randint(0, 1000, (batch,), device=device)
    guided, z, labels = with_guidance(teacher, noise, y, 1.5)
    t = torch.full((2 * batch,), 500, device=device)

    def model_fn(x, t, y):
        with bf16:
            return guided(x, t, y).float()

    with torch.no_grad():
        solve = timed(lambda: solve_trajectories(model_fn, diffusion, z, dict(y=labels), meta), args.repeats, device)
        forward = timed(lambda: model_fn(z, t, labels), args.repeats, device)
    return batch / solve, batch / (S * forward)


def pixart_table(num_steps, history_layers, teacher_steps):
    """GFLOPs per image of PixArt-Sigma's teacher solve and its students, at 512 and 1024."""
    from diffusers import PixArtTransformer2DModel
    print(f"PixArt-Sigma-XL/2, {pixart.TEXT_TOKENS} T5 tokens (the T5 encoder not counted), GFLOPs per image "
          f"(multiply-accumulates)", flush=True)
    header = ["resolution", "parameters", f"teacher {teacher_steps}-step CFG", f"ARD K={num_steps} N=0",
              f"ARD K={num_steps} N={history_layers}", "teacher / ARD"]
    print_row(header)
    print_row(["---"] * len(header))
    for resolution in (512, 1024):
        with torch.device("meta"):
            model = PixArtTransformer2DModel(**pixart.sigma_config(resolution))
        config = pixart.public_config(model.config)
        teacher = pixart.teacher_gflops(config, teacher_steps)
        students = [pixart.gflops(config, num_steps, n) for n in (0, history_layers)]
        print_row([f"{resolution}²", f"{sum(p.numel() for p in model.parameters()) / 1e6:.0f}M", f"{teacher:,.0f}",
                   *(f"{s:,.0f}" for s in students), f"{teacher / students[1]:.1f}x"])


# stabilityai/sd-vae-ft-ema's config.json (the DiT VAE), for counting without its weights
SD_VAE_CONFIG = dict(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, norm_num_groups=32,
                     block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
                     up_block_types=("UpDecoderBlock2D",) * 4)


def create_teacher(args):
    """The --model DiT, with any of --depth, --hidden-size, --num-heads, --patch-size and --in-channels in place of
    its own, on latents --downsampling times smaller than the image; --arch lightningdit: LightningDiT's blocks."""
    overrides = dict(depth=args.depth, hidden_size=args.hidden_size, num_heads=args.num_heads,
                     patch_size=args.patch_size, in_channels=args.in_channels)
    overrides = {k: v for k, v in overrides.items() if v}
    if args.arch == "dit":
        return create_dit(args.model, args.image_size, downsampling=args.downsampling,
                          learn_sigma=not args.no_learned_sigma, **overrides)
    with torch.device("meta"):
        config = create_dit(args.model, args.image_size, downsampling=args.downsampling, **overrides).config
    return build_network(dict(config, learn_sigma=False, arch=args.arch))


def counted_gflops(fn):
    """GFLOPs (multiply-accumulates) of running fn(), counted by torch's FLOP counter."""
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops() / 2e9


def gan_table(args):
    """GFLOPs per image of one R+D step (train.py --stage gan after its warm-up), part by part, counted on
    weightless models (the step's own loss functions): the generator's regression and adversarial terms
    with the adaptive weight's two extra gradients, the discriminator step, and encoding the real image."""
    from diffusers.models import AutoencoderKL
    with torch.device("meta"):
        teacher = create_teacher(args)
    student = ARD(teacher, args.num_steps, args.history_layers).to("meta")  # its masks are built from data
    with torch.device("meta"):
        discriminator = Discriminator(teacher)
        autoencoder = Autoencoder(AutoencoderKL(**SD_VAE_CONFIG))
        C, H = teacher.config["in_channels"], teacher.config["input_size"]
        stages, y, t = torch.randn(1, args.num_steps, C, H, H), torch.zeros(1, dtype=torch.long), torch.zeros(1)
        images = torch.randn(1, 3, args.image_size, args.image_size)
        fake = torch.randn(1, C, H, H)

    def generator_step():
        prediction = student(stages, y)
        regression = distillation_loss(prediction, stages)[0]
        adversarial = generator_hinge_loss(discriminator(prediction[:, -1], t, y))
        weight = adaptive_weight(regression, adversarial, student.heads[-1].linear.weight)[0]
        (regression + weight * adversarial).backward()

    def discriminator_step():
        real = autoencoder.encode(images)
        discriminator_hinge_loss(discriminator(real, t, y), discriminator(fake, t, y)).backward()

    parts = {"generator (student fwd + bwd, teacher features, adaptive weight)": counted_gflops(generator_step),
             "discriminator (features of real and fake, heads' bwd)": counted_gflops(discriminator_step)}
    encode = counted_gflops(lambda: autoencoder.encode(images))
    total = sum(parts.values())
    print(f"{args.model} {args.image_size}², K={args.num_steps}, N={args.history_layers}: one R+D step, "
          "GFLOPs per image (multiply-accumulates)", flush=True)
    print_row(["part", "GFLOPs/img", "share"])
    print_row(["---"] * 3)
    for name, cost in parts.items():
        print_row([name, f"{cost:.4g}", f"{100 * cost / total:.1f}%"])
    print_row(["of which: encoding the real image (SD-VAE encoder)", f"{encode:.4g}", f"{100 * encode / total:.1f}%"])


CHECKPOINT_RANKS = 2


def training_state(args):
    """A training checkpoint's state, as train.py saves it: the --model DiT, its EMA and AdamW's moments."""
    model = create_teacher(args)
    opt = torch.optim.AdamW(model.parameters())
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()  # AdamW's state, as after any training step
    opt.zero_grad(set_to_none=True)
    return {"model": model.state_dict(), "ema": copy.deepcopy(model).state_dict(), "opt": opt.state_dict(),
            "step": 1, "args": dict(model=args.model, depth=args.depth)}


def blocked_seconds(save):
    """Seconds from a barrier until save() returns on this rank."""
    dist.barrier()
    start = time.perf_counter()
    result = save()
    return time.perf_counter() - start, result


def checkpoint_worker(rank, port, state, folder, results):
    """One of CHECKPOINT_RANKS gloo processes, each with `state` as a DDP replica: one checkpoint written as train.py
    did (rank 0 with torch.save, the others waiting in a collective) and as it does (save_checkpoint); rank 0 puts
    every rank's (blocked s, bytes written, s until written) of both into `results`."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=CHECKPOINT_RANKS)
    group = checkpoint_group(timeout_minutes=60)
    single = os.path.join(folder, "single.pt")
    before, _ = blocked_seconds(lambda: on_rank_zero(rank, lambda: atomic_write(single, lambda tmp: torch.save(
        state, tmp))))
    before_bytes = os.path.getsize(single) if rank == 0 else 0
    sharded = os.path.join(folder, "sharded")
    start = time.perf_counter()
    after, writing = blocked_seconds(lambda: save_checkpoint(sharded, state, group))
    writing.result()
    written = time.perf_counter() - start
    after_bytes = sum(os.path.getsize(f) for f in glob.glob(os.path.join(sharded, f"__{rank}_*")))
    rows = [None] * CHECKPOINT_RANKS
    dist.all_gather_object(rows, ((before, before_bytes, before), (after, after_bytes, written)))
    if rank == 0:
        results.put(rows)
    dist.destroy_process_group()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def checkpoint_table(args):
    """The seconds each of CHECKPOINT_RANKS gloo processes is blocked by one checkpoint and the bytes it writes:
    rank 0's synchronous torch.save before, every rank's share in the background (train.save_checkpoint) after."""
    # The replicas are alike: forked, the ranks share one copy in this machine's memory until they write to it
    state = training_state(args)
    results = mp.get_context("fork").SimpleQueue()
    with tempfile.TemporaryDirectory(dir=args.checkpoint_dir) as folder:
        mp.start_processes(checkpoint_worker, (free_port(), state, folder, results), nprocs=CHECKPOINT_RANKS,
                           start_method="fork")
        rows = results.get()
    total = rows[0][0][1]
    print(f"one checkpoint of {args.model}" + (f" at depth {args.depth}" if args.depth else "")
          + f" (model, EMA, AdamW: {total / 1e9:.2f} GB), {CHECKPOINT_RANKS} gloo processes, torch {torch.__version__}",
          flush=True)
    print_row(["writer", "rank", "blocked s", "MB written", "s until on disk"])
    print_row(["---"] * 5)
    for column, writer in enumerate(["rank 0, torch.save (before)", "every rank, async sharded (after)"]):
        for rank, measured in enumerate(rows):
            blocked, written, done = measured[column]
            print_row([writer, rank, f"{blocked:.2f}", f"{written / 1e6:.1f}", f"{done:.2f}"])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="DiT-XL/2")
    p.add_argument("--image-size", type=int, default=256)
    p.add_argument("--depth", type=int, help="override the model's depth (small CPU checks)")
    p.add_argument("--hidden-size", type=int)
    p.add_argument("--num-heads", type=int)
    p.add_argument("--patch-size", type=int, help="override the model's patch size (XL/1: 1)")
    p.add_argument("--in-channels", type=int, help="latent channels (VA-VAE: 32)")
    p.add_argument("--downsampling", type=int, default=8, help="the VAE's (SD-VAE: 8, VA-VAE: 16)")
    p.add_argument("--arch", choices=["dit", "lightningdit"], default="dit",
                   help="lightningdit: RMSNorm, SwiGLU, rotary positions (LightningDiT-XL/1)")
    p.add_argument("--no-learned-sigma", action="store_true", help="a velocity teacher's output (REPA-E's SiT-XL/1)")
    p.add_argument("--num-steps", type=int, default=4)
    p.add_argument("--history-layers", type=int, default=6)
    p.add_argument("--teacher-steps", type=int, default=None, help="default 25 (DiT), 20 (--pixart)")
    p.add_argument("--train-batch", type=int, default=32, help="per-GPU training batch")
    p.add_argument("--sample-batches", type=int, nargs="+", default=[1, 32])
    p.add_argument("--extract-batch", type=int, default=64)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--precision", choices=["bf16", "fp32"], default="bf16")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--attention", choices=["sdpa", "flex"], default="sdpa", help="the students' history blocks")
    p.add_argument("--parts", nargs="+", choices=["train", "sample", "extract"], default=["train", "sample", "extract"],
                   help="what to measure (compiling every part of DiT-XL/2 takes minutes)")
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak for MFU (H100 SXM: 989)")
    p.add_argument("--pixart", action="store_true",
                   help="print the GFLOPs of PixArt-Sigma's teacher and students at 512 and 1024 (20 teacher steps "
                        "unless --teacher-steps says otherwise) and exit")
    p.add_argument("--gan", action="store_true", help="print the GFLOPs of one R+D step, part by part, and exit")
    p.add_argument("--checkpoint", action="store_true",
                   help="print the seconds each of 2 gloo processes is blocked by one training checkpoint, before "
                        "and after sharded asynchronous writes, and the bytes each writes, and exit")
    p.add_argument("--checkpoint-dir", default=None,
                   help="with --checkpoint: where to write (the filesystem measured; default: the temporary folder)")
    args = p.parse_args(argv)
    if args.attention == "flex" and not args.compile:
        p.error("--attention flex needs --compile (eager FlexAttention materialises every score)")
    if args.pixart:
        return pixart_table(args.num_steps, args.history_layers, args.teacher_steps or 20)
    if args.gan:
        return gan_table(args)
    if args.checkpoint:
        return checkpoint_table(args)
    args.teacher_steps = args.teacher_steps or 25
    device = torch.device(args.device)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    bf16 = autocast(device, args.precision)
    teacher = create_teacher(args).to(device)
    config = teacher.config
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"{args.model} {args.image_size}², K={args.num_steps}, {args.precision}, compile={args.compile}, "
          f"attention={args.attention}, torch {torch.__version__}, on {name}", flush=True)

    header = ["model", "GFLOPs/img", "train img/s", "MFU", "peak GB", *(f"{b} img ms" for b in args.sample_batches)]
    print_row(header)
    print_row(["---"] * len(header))
    print_row(["teacher (1 step)", f"{gflops(config):.1f}", *["-"] * (len(header) - 2)])
    costs = {}
    for N in sorted({0, args.history_layers}):
        costs[N] = gflops(config, args.num_steps, N)
        student = ARD(teacher, args.num_steps, N, attention=args.attention).to(device)
        cells = ["-"] * 3
        if "train" in args.parts:
            rate, memory = training_rate(student, args.train_batch, args, device, bf16)
            mfu = rate * 3 * 2 * costs[N] * 1e9 / (args.peak_tflops * 1e12)  # fwd + bwd = 3 forwards; 2 FLOPs a MAC
            cells = [f"{rate:.1f}", f"{100 * mfu:.1f}%", f"{memory:.1f}"]
        latencies = [f"{sampling_ms(student, b, args, device, bf16):.1f}" if "sample" in args.parts else "-"
                     for b in args.sample_batches]
        print_row([f"ARD N={N}" + (" (step distillation)" if N == 0 else ""), f"{costs[N]:.1f}", *cells, *latencies])
        del student
    print(f"history overhead at sampling: {100 * (costs[args.history_layers] / costs[0] - 1):.2f}% FLOPs")
    if "extract" in args.parts:
        solve, bare = extraction_rates(teacher, args.extract_batch, args, device, bf16)
        print(f"trajectory extraction ({args.teacher_steps} steps, CFG, batch {args.extract_batch}): "
              f"{solve:.2f} traj/s, {100 * solve / bare:.1f}% of the bare forward rate ({bare:.2f} traj/s)")


def print_row(cells):
    print("| " + " | ".join(map(str, cells)) + " |", flush=True)


if __name__ == "__main__":
    main()
