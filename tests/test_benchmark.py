import argparse
import re

import pytest

import benchmark

TINY = ["--model", "DiT-S/2", "--depth", "2", "--hidden-size", "64", "--num-heads", "2", "--image-size", "32",
        "--num-steps", "4", "--history-layers", "1", "--train-batch", "2", "--sample-batches", "1", "2",
        "--extract-batch", "2", "--teacher-steps", "4", "--device", "cpu", "--precision", "fp32", "--repeats", "1"]


def test_benchmark_prints_the_table_for_a_tiny_config(capsys):
    benchmark.main(TINY)
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("| ")]
    assert rows[0].split("|")[1].strip() == "model" and len(rows) == 2 + 3  # header, rule, teacher, N=0, N=1
    assert "teacher (1 step)" in rows[2] and "N=0" in rows[3] and "N=1" in rows[4]
    for row in rows[3:]:
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert float(cells[2]) > 0 and float(cells[5]) > 0 and float(cells[6]) > 0  # img/s and both latencies
    overhead = float(re.search(r"history overhead at sampling: ([0-9.]+)%", out).group(1))
    assert 0 < overhead < 5
    assert re.search(r"trajectory extraction .*: [0-9.]+ traj/s, [0-9.]+% of the bare forward rate", out)


def test_pixart_table_counts_the_real_architecture(capsys):
    """512 and 1024 rows from the weightless PixArt-Sigma-XL/2; the formula agrees with PyTorch's
    FLOP counter on a meta-device forward of the 512 model (no weights, no compute)."""
    import torch
    from diffusers import PixArtTransformer2DModel
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    import pixart
    benchmark.main(["--pixart"])
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in capsys.readouterr().out.splitlines()
            if line.startswith("| ")]
    assert rows[0][2] == "teacher 20-step CFG" and [r[0] for r in rows[2:]] == ["512²", "1024²"]
    assert rows[2][1] == rows[3][1] == "611M"
    with torch.device("meta"):
        model = PixArtTransformer2DModel(**pixart.sigma_config(512))
        x, text = torch.empty(1, 4, 64, 64), torch.empty(1, 300, 4096)
        mask, t = torch.ones(1, 300), torch.tensor([999])
    config = pixart.public_config(model.config)
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(x, encoder_hidden_states=text, encoder_attention_mask=mask, timestep=t)
    assert counter.get_total_flops() / 2e9 == pytest.approx(pixart.gflops(config), rel=1e-9)
    assert float(rows[2][2].replace(",", "")) == pytest.approx(pixart.teacher_gflops(config, 20), abs=0.5)
    assert float(rows[2][4].replace(",", "")) == pytest.approx(pixart.gflops(config, 4, 6), abs=0.5)


def test_flex_attention_without_compile_stops(capsys):
    with pytest.raises(SystemExit) as e:
        benchmark.main(TINY + ["--attention", "flex"])
    assert e.value.code == 2
    assert "--attention flex needs --compile (eager FlexAttention materialises every score)" in capsys.readouterr().err


def test_gan_table_counts_every_part_of_the_step(capsys):
    """One R+D step's parts, counted on weightless models: the generator spends at least the student's forward
    and backward (three forwards) and one pass of the teacher's features; the discriminator at least two
    feature passes (real, fake) and the encoding of the real image, which is its own row."""
    from ard import gflops
    from models import create_dit
    benchmark.main(TINY + ["--gan"])
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in capsys.readouterr().out.splitlines()
            if line.startswith("| ")]
    assert rows[0] == ["part", "GFLOPs/img", "share"] and len(rows) == 5
    generator, discriminator, encode = (float(r[1]) for r in rows[2:])
    config = create_dit("DiT-S/2", 32, depth=2, hidden_size=64, num_heads=2).config
    assert generator >= 3 * gflops(config, 4, 1) + gflops(config)
    assert discriminator >= 2 * gflops(config) + encode > 0
    assert sum(float(r[2].rstrip("%")) for r in rows[2:4]) == pytest.approx(100, abs=0.2)


def test_checkpoint_table_spreads_the_bytes_over_the_ranks(capsys):
    """2 gloo processes: before, rank 0 writes the whole state and both ranks wait for it; after, each rank writes
    about half of it (the replicated tensors spread by torch's planner), together about as much as before."""
    benchmark.main(TINY + ["--checkpoint"])
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in capsys.readouterr().out.splitlines()
            if line.startswith("| ")]
    assert rows[0] == ["writer", "rank", "blocked s", "MB written", "s until on disk"] and len(rows) == 6
    (before0, before1, after0, after1) = [[float(c) for c in r[1:]] for r in rows[2:]]
    assert [before0[0], before1[0], after0[0], after1[0]] == [0, 1, 0, 1]
    assert before0[2] > 0 and before1[2] == 0
    assert after0[2] + after1[2] == pytest.approx(before0[2], rel=0.1)
    assert after0[2] == pytest.approx(after1[2], rel=0.2)
    assert all(r[1] > 0 and r[3] >= r[1] for r in (before0, before1, after0, after1))


@pytest.mark.parametrize("teacher", [["--arch", "lightningdit"], ["--no-learned-sigma"]])
def test_va_vae_teachers_at_patch_one_count_what_torch_counts(teacher, capsys):
    """LightningDiT and REPA-E's SiT at patch 1 on 32-channel latents (f16): the table runs, and its teacher GFLOPs
    are what PyTorch's FLOP counter counts of one forward (width 64: SwiGLU's 2/3 width counts apart from an MLP's)."""
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from ard import gflops
    xl1 = ["--patch-size", "1", "--in-channels", "32", "--downsampling", "16", "--hidden-size", "64", "--image-size",
           "64", *teacher]
    benchmark.main(TINY + xl1 + ["--parts", "sample"])
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in capsys.readouterr().out.splitlines()
            if line.startswith("| ")]
    args = argparse.Namespace(model="DiT-S/2", image_size=64, depth=2, hidden_size=64, num_heads=2, patch_size=1,
                              in_channels=32, downsampling=16, arch="lightningdit" if "--arch" in teacher else "dit",
                              no_learned_sigma="--no-learned-sigma" in teacher)
    net = benchmark.create_teacher(args).eval()
    assert (net.config["patch_size"], net.config["in_channels"], net.config["input_size"]) == (1, 32, 4)
    assert net.config.get("arch", "dit") == args.arch and not net.config["learn_sigma"]
    x, t, y = torch.randn(1, 32, 4, 4), torch.zeros(1), torch.zeros(1, dtype=torch.long)
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
        counted = benchmark.counted_gflops(lambda: net(x, t, y))
    assert counted == pytest.approx(gflops(net.config), rel=1e-9)
    assert float(rows[2][1]) == pytest.approx(gflops(net.config), abs=0.05)
