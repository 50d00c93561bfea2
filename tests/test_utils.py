"""utils.py's distributed set-up and durable writes, and how the torchrun scripts use them."""
import datetime
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

import extract_trajectories
import sample_ddp
import train
import utils

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class Stop(Exception):
    pass


# The shortest valid command line of each torchrun script (nothing needs to exist before set-up).
SCRIPTS = [(train, ["--stage", "teacher", "--data-path", "digits", "--device", "cpu"]),
           (extract_trajectories, ["--ckpt", "teacher.pt", "--out", "traj", "--device", "cpu"]),
           (sample_ddp, ["--ckpt", "teacher.pt", "--out", "samples.npz", "--device", "cpu"])]


@pytest.mark.parametrize("script, argv", SCRIPTS, ids=lambda s: getattr(s, "__name__", ""))
@pytest.mark.parametrize("flag, minutes", [([], 60), (["--dist-timeout", "90"], 90)])
def test_torchrun_scripts_set_the_process_group_timeout(script, argv, flag, minutes, monkeypatch):
    """A rank waits --dist-timeout minutes (default 60, not NCCL's 10) for the others, e.g. while
    rank 0 writes a checkpoint of many GB to a slow shared filesystem."""
    timeouts = []

    def rendezvous(url, timeout):
        timeouts.append(timeout)
        return iter([(utils.dist.HashStore(), 0, 1)])

    def init_process_group(backend, store, rank, world_size, timeout):
        assert backend == "gloo" and isinstance(store, utils.dist.PrefixStore) and (rank, world_size) == (0, 1)
        timeouts.append(timeout)
        raise Stop

    monkeypatch.setenv("RANK", "0")
    monkeypatch.setattr(utils.dist, "rendezvous", rendezvous)
    monkeypatch.setattr(utils.dist, "init_process_group", init_process_group)
    with pytest.raises(Stop):
        script.main(argv + flag)
    assert timeouts == [datetime.timedelta(minutes=minutes)] * 2


def test_a_restarted_group_meets_under_keys_of_its_own_round():
    """Each rank's join count names the round: the same on every rank of a round, whichever rank joins first and
    whether its launcher restarted it or was relaunched (tests/test_cluster.py restarts real groups)."""
    store = utils.dist.HashStore()
    assert [utils.join_count(store, rank) for rank in (0, 1, 1, 0, 0, 1)] == [1, 1, 2, 2, 3, 3]


@pytest.mark.parametrize("text, names", [("TERM,USR1", ["SIGTERM", "SIGUSR1"]), ("sigint", ["SIGINT"]),
                                         ("none", [])])
def test_stop_signals_are_named_without_sig(text, names):
    assert utils.signal_names(text) == names


def test_an_unknown_stop_signal_stops_before_set_up(capsys):
    with pytest.raises(SystemExit):
        train.main(["--stage", "teacher", "--data-path", "digits", "--stop-signals", "TERM,USR3"])
    assert "argument --stop-signals: unknown signal SIGUSR3" in capsys.readouterr().err


def test_a_stop_signal_is_remembered_not_obeyed():
    """The process goes on to the next boundary of its work, where agreed() (one process: its own flag) says so."""
    previous = utils.signal.getsignal(utils.signal.SIGUSR1)
    try:
        stop = utils.StopRequest(["SIGUSR1"])
        assert not stop.agreed()
        os.kill(os.getpid(), utils.signal.SIGUSR1)
        assert stop.received == "SIGUSR1" and stop.agreed()
        with pytest.raises(SystemExit) as e:
            stop.exit_if_agreed("nothing")
        assert e.value.code == utils.REQUEUE_EXIT_CODE == 75
    finally:
        utils.signal.signal(utils.signal.SIGUSR1, previous)


STOP_WORKER = """
import os, signal, sys, time
sys.path.insert(0, os.environ["ROOT"])
from utils import StopRequest, init_distributed
rank, _, _ = init_distributed(1, "cpu")
stop = StopRequest(["SIGUSR1"])
if rank == 1:  # rank 0 has no work left and waits at the boundary, where its own handler cannot run
    time.sleep(2)
    os.kill(os.getpid(), signal.SIGUSR1)
stop.exit_if_agreed("nothing")
print(f"rank {rank} went on")
"""


def test_a_rank_done_before_the_signal_stops_with_the_one_that_received_it(tmp_path):
    """Units of work end at different times on different ranks: the stop is agreed at the boundary, so a rank that
    finished first and waits there exits 75 with the signalled one instead of waiting in the next barrier."""
    script = tmp_path / "stop_worker.py"
    script.write_text(STOP_WORKER)
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                             "MASTER_PORT")}
    env.update(ROOT=ROOT, CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(script)], env=env, capture_output=True, text=True, timeout=120)
    output = proc.stdout + proc.stderr
    assert "went on" not in output, output[-3000:]
    assert output.count("stopped by") == 2 and re.search(r"exitcode\s*: 75", output), output[-3000:]


def test_atomic_write_is_durable_before_and_after_the_rename(tmp_path, monkeypatch):
    """The new file's data reach the disk before its name replaces the old one, and the rename
    itself after: a machine crash leaves the old file or the complete new one, never an empty one."""
    events = []
    fsync, replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}"))),
                                                 fsync(fd))[1])
    monkeypatch.setattr(os, "replace", lambda src, dst: (events.append(("replace", src, dst)), replace(src, dst))[1])
    path = os.path.join(os.path.realpath(tmp_path), "checkpoint.pt")
    utils.atomic_write(path, lambda tmp: open(tmp, "wb").write(b"weights"))
    assert events == [("fsync", path + ".tmp"), ("replace", path + ".tmp", path), ("fsync", os.path.dirname(path))]
    assert open(path, "rb").read() == b"weights"


def test_evaluation_noise_never_equals_trajectory_noise():
    """Both streams over several seeds and indices: every draw is distinct, and the trajectory stream
    is the plain per-index generator (so earlier trajectories keep their bytes)."""
    draws = {stream: torch.cat([utils.index_noise_and_labels(seed, range(200), (4,), 10, stream=stream)[0]
                                for seed in range(3)]) for stream in utils.NOISE_STREAMS}
    everything = torch.cat(list(draws.values()))
    assert len(set(map(tuple, everything.tolist()))) == len(everything)
    plain = torch.from_numpy(np.random.default_rng(utils.index_seed(2, 7)).standard_normal(4, dtype=np.float32))
    assert torch.equal(draws["trajectories"][2 * 200 + 7], plain)
    with pytest.raises(ValueError, match="noise stream must be one of trajectories, evaluation"):
        utils.index_noise_and_labels(0, range(2), (4,), 10, stream="test")


def test_progress_in_a_log_file_is_plain_lines(monkeypatch, capsys):
    """Not on a terminal (stderr a file, as under torchrun or SLURM): no bar and no carriage returns,
    one line per interval and one at the end, on stdout."""
    bar = utils.progress(10, "extraction", "traj", every=0.0)
    for _ in range(3):
        bar.update(2)
    bar.close()
    out, err = capsys.readouterr()
    assert err == "" and "\r" not in out
    lines = out.splitlines()
    assert len(lines) == 4 and lines[2].startswith("extraction: 6/10 traj (60%), ") and "min left" in lines[2]
    assert lines[-1].startswith("extraction: 6/10 traj")
    quiet = utils.progress(10, "ard", "step", lines=False)  # the caller's log lines say how far it is
    quiet.update(5)
    quiet.close()
    assert capsys.readouterr() == ("", "")
    monkeypatch.setattr(utils.sys.stderr, "isatty", lambda: True)
    assert isinstance(utils.progress(10, "ard", "step", lines=False), utils.tqdm)  # a terminal keeps its bar


@pytest.mark.parametrize("script, argv", SCRIPTS, ids=lambda s: getattr(s, "__name__", ""))
def test_torchrun_without_cuda_stops_with_the_cause(script, argv, monkeypatch, capsys):
    """Under torchrun a node whose driver does not fit torch's CUDA build stops at once with torch's
    reason and the way to run on the CPU, instead of training on the CPU with gloo unannounced."""
    def driver_too_old():
        raise RuntimeError("The NVIDIA driver on your system is too old (found version 11040).\nMore text")

    monkeypatch.setenv("RANK", "0")
    monkeypatch.setattr(utils.torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(utils.torch.cuda, "init", driver_too_old)
    monkeypatch.setattr(utils.dist, "init_process_group", lambda *a, **k: pytest.fail("set-up went on"))
    with pytest.raises(SystemExit) as e:
        script.main([a for a in argv if a not in ("--device", "cpu")])
    message = str(e.value.code)
    assert "\n" not in message and message.startswith("CUDA is unavailable to torch ")
    assert message.endswith("The NVIDIA driver on your system is too old (found version 11040); "
                            "pass --device cpu to run on the CPU")
