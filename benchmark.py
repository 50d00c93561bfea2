"""Speed and cost of the teacher, step distillation (N=0) and ARD, side by side.

    python benchmark.py                                     # DiT-XL/2 256², K=4, N=6, bf16, on a GPU
    python benchmark.py --compile                           # the same with torch.compile
    python benchmark.py --model DiT-S/2 --depth 2 --hidden-size 64 --num-heads 2 --image-size 64 \
        --train-batch 2 --sample-batches 1 2 --extract-batch 2 --teacher-steps 4 --device cpu --precision fp32

Prints one table: GFLOPs per image (DiT's multiply-accumulate convention), training
samples/s with model-FLOPs utilisation and peak memory, K-step sampling latency for 1 and
32 images, and the teacher's trajectory-extraction rate against its bare forward rate.
Weights are random: speed does not depend on them.
"""
import argparse
import time

import torch

from ard import ARD, distillation_loss, gflops
from diffusion import create_diffusion, student_timesteps
from extract_trajectories import solve_trajectories
from models import create_dit, with_guidance
from utils import autocast


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
    S = args.teacher_steps
    steps, _ = student_timesteps(args.num_steps, S)
    meta = dict(cfg_scale=1.5, boundary_steps=steps)
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
        solve = timed(lambda: solve_trajectories(model_fn, diffusion, z, labels, meta), args.repeats, device)
        forward = timed(lambda: model_fn(z, t, labels), args.repeats, device)
    return batch / solve, batch / (S * forward)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="DiT-XL/2")
    p.add_argument("--image-size", type=int, default=256)
    p.add_argument("--depth", type=int, help="override the model's depth (small CPU checks)")
    p.add_argument("--hidden-size", type=int)
    p.add_argument("--num-heads", type=int)
    p.add_argument("--num-steps", type=int, default=4)
    p.add_argument("--history-layers", type=int, default=6)
    p.add_argument("--teacher-steps", type=int, default=25)
    p.add_argument("--train-batch", type=int, default=32, help="per-GPU training batch")
    p.add_argument("--sample-batches", type=int, nargs="+", default=[1, 32])
    p.add_argument("--extract-batch", type=int, default=64)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--precision", choices=["bf16", "fp32"], default="bf16")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak for MFU (H100 SXM: 989)")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    bf16 = autocast(device, args.precision)
    overrides = {k: v for k, v in dict(depth=args.depth, hidden_size=args.hidden_size, num_heads=args.num_heads).items()
                 if v}
    teacher = create_dit(args.model, args.image_size, **overrides).to(device)
    config = teacher.config
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"{args.model} {args.image_size}², K={args.num_steps}, {args.precision}, compile={args.compile}, on {name}")

    rows = [("teacher (1 step)", gflops(config), None)]
    for N in sorted({0, args.history_layers}):
        rows.append((f"ARD N={N}" + (" (step distillation)" if N == 0 else ""),
                     gflops(config, args.num_steps, N), ARD(teacher, args.num_steps, N).to(device)))
    header = ["model", "GFLOPs/img", "train img/s", "MFU", "peak GB", *(f"{b} img ms" for b in args.sample_batches)]
    table = []
    for label, cost, student in rows:
        if student is None:
            table.append([label, f"{cost:.1f}", *["-"] * (len(header) - 2)])
            continue
        rate, memory = training_rate(student, args.train_batch, args, device, bf16)
        mfu = rate * 3 * 2 * cost * 1e9 / (args.peak_tflops * 1e12)  # fwd + bwd = 3 forwards; 2 FLOPs per MAC
        latencies = [f"{sampling_ms(student, b, args, device, bf16):.1f}" for b in args.sample_batches]
        table.append([label, f"{cost:.1f}", f"{rate:.1f}", f"{100 * mfu:.1f}%", f"{memory:.1f}", *latencies])
        del student
    widths = [max(len(str(r[i])) for r in [header, *table]) for i in range(len(header))]
    for r in [header, ["-" * w for w in widths], *table]:
        print("| " + " | ".join(str(c).ljust(w) for c, w in zip(r, widths)) + " |")
    print(f"history overhead at sampling: {100 * (rows[-1][1] / rows[1][1] - 1):.2f}% FLOPs")
    solve, bare = extraction_rates(teacher, args.extract_batch, args, device, bf16)
    print(f"trajectory extraction ({args.teacher_steps} steps, CFG, batch {args.extract_batch}): {solve:.2f} traj/s, "
          f"{100 * solve / bare:.1f}% of the bare forward rate ({bare:.2f} traj/s)")


if __name__ == "__main__":
    main()
