"""tools/gpu_check.py's dry run: every part of the GPU check at a tiny size on the CPU."""
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_gpu_check_dry_run_runs_every_part(tmp_path):
    env = dict(os.environ, OUT=str(tmp_path), OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run([sys.executable, "tools/gpu_check.py", "--dry-run"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=400)
    summary = (tmp_path / "summary.txt").read_text().splitlines()
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert [line.split(":")[0] for line in summary] == ["cuda_tests", "benchmark_eager", "benchmark_compiled",
                                                        "teacher", "extract", "train_bf16", "train_fp32"]
    assert all(": ok," in line for line in summary)
    assert "| model | GFLOPs/img |" in (tmp_path / "benchmark_eager.log").read_text()
    rows = (tmp_path / "train_loss.txt").read_text().splitlines()[2:]
    assert len(rows) == 2 and all(r.split("|")[2] == r.split("|")[3] for r in rows)  # CPU: bf16 autocast is off
