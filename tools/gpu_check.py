"""Everything issue 22 measures on one H100/H200, in about 8 minutes, each part under its own time limit.

    python tools/gpu_check.py              # on the GPU machine, from the repository root
    python tools/gpu_check.py --dry-run    # the same parts at a tiny size on the CPU (a minute or so)
    python tools/gpu_check.py --parts train_bf16 train_fp32    # rerun only some (a part's output is redone)

Parts, in order: the test suite's CUDA variants; benchmark.py at DiT-XL/2 256², K=4, N=6, bf16, eager and
compiled (the teacher and N=0 beside N=6: training samples/s, peak memory, 4-step sampling of 1 and 32
images, extraction against the teacher's forward rate); and a short `train.py --stage ard --compile
--attention flex` run on freshly extracted trajectories, bf16 beside fp32 over the same steps (a random
DiT-S/2 teacher in pixel space at 32², L=256 tokens as at 256²: no weights need downloading). Every log goes
to $OUT (default ./gpu_out); summary.txt lists each part's status and time, train_loss.txt the two losses.
The dry run swaps in tiny models, no compilation, and SDPA (FlexAttention has no CPU backward).
"""
import argparse
import os
import re
import shutil
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PY = sys.executable
TRAIN_STEPS = 30

# (name, seconds allowed, command) on the GPU; the dry run's variants below.
TINY_DIT = ["--model", "DiT-S/2", "--depth", "2", "--hidden-size", "64", "--num-heads", "2"]
TINY_BENCH = [*TINY_DIT, "--image-size", "32", "--history-layers", "1", "--train-batch", "2", "--sample-batches", "1",
              "2", "--extract-batch", "2", "--teacher-steps", "4", "--device", "cpu", "--precision", "fp32",
              "--repeats", "1"]


def parts(out, dry):
    """[(name, seconds allowed, command, the directory it writes)]."""
    teacher, traj = os.path.join(out, "teacher"), os.path.join(out, "traj")
    size, arch = (["--image-size", "8"], TINY_DIT) if dry else (["--image-size", "32"], ["--model", "DiT-S/2"])
    teacher_ckpt = os.path.join(teacher, "000-teacher-tiny", "checkpoints", "0000001")
    common = ["--num-workers", "0", "--log-every", "1", "--sample-every", "100000", *(["--device", "cpu"] * dry)]
    student = ["--history-layers", "1" if dry else "6", "--global-batch-size", "8" if dry else "64"]
    fast = [] if dry else ["--compile", "--attention", "flex"]
    steps = 2 if dry else TRAIN_STEPS

    def ard(precision):
        return [PY, "train.py", "--stage", "ard", "--teacher", teacher_ckpt, "--data-path", traj, *student, *fast,
                "--precision", precision, "--iterations", str(steps), "--ckpt-every", str(steps),
                "--results-dir", os.path.join(out, precision), *common]
    bench = TINY_BENCH if dry else []
    return [
        ("cuda_tests", 120, [PY, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-k", "cuda",
                             "tests/test_fast_paths.py", "tests/test_sampling.py"], None),
        ("benchmark_eager", 120, [PY, "benchmark.py", *bench], None),
        ("benchmark_compiled", 240, [PY, "benchmark.py", *bench, *(["--parts", "extract"] if dry else []),
                                     "--compile", "--attention", "flex"], None),
        ("teacher", 45, [PY, "train.py", "--stage", "teacher", "--data-path", "digits", *size, *arch, "--vae", "none",
                         "--iterations", "1", "--ckpt-every", "1", "--global-batch-size", "8", "--sample-steps", "2",
                         "--results-dir", teacher, "--name", "tiny", *common], teacher),
        ("extract", 60, [PY, "extract_trajectories.py", "--ckpt", teacher_ckpt, "--out", traj, "--num-samples", "64",
                         "--shard-size", "64", "--batch-size", "64",
                         *(["--teacher-steps", "4", "--device", "cpu"] if dry else [])], traj),
        ("train_bf16", 120, ard("bf16"), os.path.join(out, "bf16")),
        ("train_fp32", 90, ard("fp32"), os.path.join(out, "fp32")),
    ]


def run_part(name, limit, command, writes, out):
    if writes:
        shutil.rmtree(writes, ignore_errors=True)
    log = os.path.join(out, f"{name}.log")
    start = time.time()
    with open(log, "w") as f:
        rc = subprocess.run(["timeout", "--kill-after=10", str(limit), *command], cwd=ROOT, stdout=f,
                            stderr=subprocess.STDOUT).returncode
    status = "ok" if rc == 0 else f"timed out after {limit} s" if rc in (124, 137) else f"failed (exit {rc})"
    line = f"{name}: {status}, {time.time() - start:.0f} s, log {log}"
    print(line, flush=True)
    return line


def losses(log):
    """{step: loss} from a train.py log."""
    return {int(m[1]): float(m[2]) for m in re.finditer(r"step (\d+) .*?\bloss=([0-9.eE+-]+|nan|inf)", log)}


def loss_table(out):
    logs = {p: open(os.path.join(out, f"train_{p}.log")).read() for p in ("bf16", "fp32")}
    bf16, fp32 = losses(logs["bf16"]), losses(logs["fp32"])
    rows = ["| step | bf16 loss | fp32 loss |", "| --- | --- | --- |"]
    rows += [f"| {s} | {bf16[s]:.5g} | {fp32.get(s, float('nan')):.5g} |" for s in sorted(bf16)]
    return "\n".join(rows)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dry-run", action="store_true", help="tiny models on the CPU: checks the script, measures nothing")
    p.add_argument("--parts", nargs="+", help="run only these parts (default: all)")
    args = p.parse_args(argv)
    out = os.path.abspath(os.environ.get("OUT") or os.path.join(ROOT, "gpu_out"))
    planned = parts(out, args.dry_run)
    unknown = set(args.parts or ()) - {name for name, *_ in planned}
    if unknown:
        p.error(f"unknown part {sorted(unknown)[0]!r}; the parts: {', '.join(name for name, *_ in planned)}")
    os.makedirs(out, exist_ok=True)
    summary = [run_part(*part, out) for part in planned if not args.parts or part[0] in args.parts]
    if all(os.path.isfile(os.path.join(out, f"train_{p}.log")) for p in ("bf16", "fp32")):
        table = loss_table(out)
        print(table)
        with open(os.path.join(out, "train_loss.txt"), "w") as f:
            f.write(table + "\n")
    with open(os.path.join(out, "summary.txt"), "w") as f:
        f.write("\n".join(summary) + "\n")
    return 0 if all(": ok," in line for line in summary) else 1


if __name__ == "__main__":
    sys.exit(main())
