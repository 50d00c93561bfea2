"""Memory of the history attention at PixArt-Sigma-1024's token layout (K=4 stages of L=4096 tokens),
on the CPU: a narrow, one-head student's forward and backward with one history block. A dense
(K·L)² boolean mask alone is 256 MiB, and SDPA turns it into a float bias of 1 GiB; measured with it
(before the per-stage attention) the peak was 1331 MB (DiT) and 1340 MB (PixArt); per stage, 60 and 72 MB."""
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BOUND_MB = 128

# Peak resident memory of building the student and one forward + backward, over the process's
# memory before (Linux: writing 5 to clear_refs resets the peak to the current size).
MEASURE = """
import sys
import torch
torch.set_num_threads(1)
family = sys.argv[1]


def megabytes(field):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) / 1024 for line in f if line.startswith(field))


def peak(size):
    torch.manual_seed(0)
    if family == "dit":
        from ard import ARD
        from models import DiT
        teacher = DiT(input_size=size, patch_size=2, in_channels=4, hidden_size=16, depth=2, num_heads=1,
                      num_classes=10)
        build, condition = lambda: ARD(teacher, 4, 1), (torch.zeros(1, dtype=torch.long),)
    else:
        from diffusers import PixArtTransformer2DModel
        from pixart import PixArtARD
        teacher = PixArtTransformer2DModel(num_attention_heads=1, attention_head_dim=16, in_channels=4,
                                           out_channels=8, num_layers=2, cross_attention_dim=16, sample_size=size,
                                           caption_channels=8, use_additional_conditions=False)
        build, condition = lambda: PixArtARD(teacher, 4, 1), (torch.randn(1, 3, 8), torch.ones(1, 3, dtype=torch.bool))
    stages = torch.randn(1, 4, 4, size, size)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = megabytes("VmRSS")
    build()(stages, *condition).square().mean().backward()
    return megabytes("VmHWM") - before


peak(16)  # first calls allocate the libraries' own state
print(peak(128))
"""


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux /proc")
@pytest.mark.parametrize("family", ["dit", "pixart"])
def test_history_attention_memory_does_not_grow_with_the_square_of_all_tokens(family):
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-c", MEASURE, family], env=env, capture_output=True, text=True,
                          timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    peak = float(proc.stdout.split()[-1])
    assert peak < BOUND_MB, f"{family}: the history attention's peak was {peak:.0f} MB, bound {BOUND_MB} MB"
