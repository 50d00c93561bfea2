import re

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
