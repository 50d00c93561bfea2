"""Runs that survive the cluster, by fault injection through the real launcher (torchrun, gloo, CPU): a worker or
a node killed mid-run, a scheduler's SIGTERM to the launcher and SLURM's SIGUSR1 to every worker. Each run is a tiny
teacher trained on the digits by 2 processes; each ends bit-identical (model, EMA, optimiser) to an uninterrupted run.

These launch torchrun several times (about 3 minutes on two busy cores): `python -m pytest tests/test_cluster.py
--run-slow` runs them.
"""
import glob
import os
import re
import signal
import socket
import subprocess
import sys
import time

import pytest

from test_train import (ROOT, assert_same_training_state, ckpt, ckpt_steps, experiments, load, log_steps,
                        teacher_argv)
from utils import REQUEUE_EXIT_CODE

pytestmark = pytest.mark.slow

ITERATIONS, CKPT_EVERY = 40, 4
KILL_AFTER = 4  # the checkpoint a fault waits for: then the run has ITERATIONS - 4 steps to go
TIMEOUT = 180


def command(results, *launcher):
    argv = teacher_argv(results, "--iterations", ITERATIONS, "--ckpt-every", CKPT_EVERY)
    return [sys.executable, "-m", "torch.distributed.run", *launcher, "train.py", *map(str, argv)]


def launch(cmd, log, **environment):
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env.update(CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1", **environment)
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=open(log, "a"), stderr=subprocess.STDOUT)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def listening(port):
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def single_node(port, rendezvous):
    endpoint = (["--master-addr=127.0.0.1", f"--master-port={port}"] if rendezvous == "static"
                else ["--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}"])
    return ["--nnodes=1", "--nproc-per-node=2", "--max-restarts=1", *endpoint]


def finish(proc, log):
    try:
        proc.wait(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise AssertionError(f"the launcher did not finish in {TIMEOUT} s:\n{read(log)[-4000:]}")
    return proc.returncode


def read(path):
    with open(path) as f:
        return f.read()


def wait_for(condition, proc, log, what):
    """Polls `condition` until it holds; fails if `proc` ends first or after TIMEOUT seconds."""
    deadline = time.time() + TIMEOUT
    while not condition():
        assert proc.poll() is None, f"the launcher ended before {what}:\n{read(log)[-4000:]}"
        assert time.time() < deadline, f"no {what} after {TIMEOUT} s"
        time.sleep(0.02)


def checkpoint_written(results, step):
    return lambda: any(step in ckpt_steps(experiment) for experiment in experiments(results))


def step_logged(results, step):
    def logged():
        logs = glob.glob(os.path.join(str(results), "*", "log.txt"))
        return bool(logs) and any(s >= step for s, _ in log_steps(os.path.dirname(logs[0])))
    return logged


def workers(launcher):
    """{RANK: pid} of a launcher's worker processes."""
    found = {}
    for task in os.listdir(f"/proc/{launcher}/task"):
        with open(f"/proc/{launcher}/task/{task}/children") as f:
            for pid in map(int, f.read().split()):
                with open(f"/proc/{pid}/environ", "rb") as env:
                    variables = dict(v.split(b"=", 1) for v in env.read().split(b"\0") if b"=" in v)
                if b"RANK" in variables:
                    found[int(variables[b"RANK"])] = pid
    return found


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """The final checkpoint of the run none of the faults touch (torchrun --standalone, 2 processes)."""
    results = tmp_path_factory.mktemp("uninterrupted")
    log = results / "launcher.log"
    assert finish(launch(command(results, "--standalone", "--nproc-per-node=2"), log), log) == 0, read(log)
    (experiment,) = experiments(results)
    return load(ckpt(experiment, ITERATIONS))


def check_resumed_once(results, uninterrupted):
    """One run directory, resumed once from a checkpoint at or after KILL_AFTER and never trained again before
    it, ending bit-identical to the uninterrupted run."""
    (experiment,) = experiments(results)
    log = read(os.path.join(experiment, "log.txt"))
    resumes = re.findall(r"resuming from \S+ \(step (\d+)\)", log)
    assert len(resumes) == 1 and int(resumes[0]) >= KILL_AFTER, resumes
    after = log.split("resuming from")[1]
    steps = [int(s) for s in re.findall(r"\] step (\d+) ", after)]
    assert steps == list(range(int(resumes[0]) + 1, ITERATIONS + 1))
    assert_same_training_state(uninterrupted, load(ckpt(experiment, ITERATIONS)))


@pytest.mark.parametrize("rendezvous", ["static", "c10d"])
def test_a_killed_worker_restarts_and_resumes(rendezvous, uninterrupted, tmp_path):
    """kill -9 of rank 1 under --max-restarts=1: torchrun restarts both workers, which rebuild their group and
    continue from the last checkpoint."""
    log = tmp_path / "launcher.log"
    proc = launch(command(tmp_path, *single_node(free_port(), rendezvous)), log)
    wait_for(checkpoint_written(tmp_path, KILL_AFTER), proc, log, f"checkpoint {KILL_AFTER}")
    os.kill(workers(proc.pid)[1], signal.SIGKILL)
    assert finish(proc, log) == 0, read(log)[-4000:]
    check_resumed_once(tmp_path, uninterrupted)


def test_a_killed_node_relaunched_with_its_command_resumes(uninterrupted, tmp_path):
    """Two nodes (one process each) on one machine, c10d rendezvous: the second node's launcher and worker are
    killed, and the same command relaunches it; the first node's worker fails, its launcher restarts it, and the
    two rebuild their group together.

    With TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1, as the README says for multi-node launches: with the agents' shared
    store (torch's default) a surviving agent of rank 0 keeps the previous round's store address and never
    publishes one for the new round, so the relaunched agent waits for it until the rendezvous times out (a
    torchrun bug; the workers never start)."""
    port = free_port()
    cmd = command(tmp_path, "--nnodes=2", "--nproc-per-node=1", "--max-restarts=1", "--rdzv-backend=c10d",
                  f"--rdzv-endpoint=127.0.0.1:{port}", "--rdzv-id=survivor")
    logs = [tmp_path / "first.log", tmp_path / "second.log"]
    unshared = dict(TORCH_DISABLE_SHARE_RDZV_TCP_STORE="1")
    first = launch(cmd, logs[0], **unshared)  # it hosts the rendezvous
    wait_for(lambda: listening(port), first, logs[0], "its rendezvous store")
    second = launch(cmd, logs[1], **unshared)
    wait_for(checkpoint_written(tmp_path, KILL_AFTER), first, logs[0], f"checkpoint {KILL_AFTER}")
    node = workers(second.pid).values()  # each worker is a session of its own
    second.kill()  # the node: its launcher, then its worker
    for pid in node:
        os.kill(pid, signal.SIGKILL)
    second.wait()
    second = launch(cmd, logs[1], **unshared)
    assert finish(second, logs[1]) == 0, read(logs[1])[-4000:]
    assert finish(first, logs[0]) == 0, read(logs[0])[-4000:]
    check_resumed_once(tmp_path, uninterrupted)


@pytest.mark.parametrize("target", ["launcher", "workers"])
def test_a_stop_signal_keeps_the_current_step(target, uninterrupted, tmp_path):
    """SIGTERM to the launcher (a scheduler's preemption: torchrun forwards it to the workers) or SIGUSR1 to every
    worker (SLURM's --signal): the workers finish the step they are in, agree on it, write a checkpoint there and
    exit with REQUEUE_EXIT_CODE; the same command continues the run."""
    log = tmp_path / "launcher.log"
    cmd = command(tmp_path, "--standalone", "--nproc-per-node=2")
    proc = launch(cmd, log)
    wait_for(step_logged(tmp_path, 5), proc, log, "step 5")
    if target == "launcher":
        proc.send_signal(signal.SIGTERM)
    else:
        for pid in workers(proc.pid).values():
            os.kill(pid, signal.SIGUSR1)
    assert finish(proc, log) != 0
    (experiment,) = experiments(tmp_path)
    stopped = re.findall(r"stopped by (SIG\w+) after step (\d+)", read(os.path.join(experiment, "log.txt")))
    assert [name for name, _ in stopped] == ["SIGTERM" if target == "launcher" else "SIGUSR1"]
    step = int(stopped[0][1])
    assert 5 <= step < ITERATIONS and log_steps(experiment)[-1][0] == step
    assert os.path.exists(ckpt(experiment, step))
    if target == "workers":  # torchrun's report: the first worker to end (it then stops the others with SIGTERM)
        assert re.search(rf"Root Cause .*?exitcode\s*: {REQUEUE_EXIT_CODE} ", read(log), re.S), read(log)[-4000:]
    assert finish(launch(cmd, log), log) == 0, read(log)[-4000:]
    assert_same_training_state(uninterrupted, load(ckpt(experiment, ITERATIONS)))
    resumed = re.findall(r"resuming from \S+ \(step (\d+)\)", read(os.path.join(experiment, "log.txt")))
    assert resumed == [str(step)]


# ---------------------------------------------------------------------------- extraction and sampling

TEACHER = os.path.join(ROOT, "assets", "digits_teacher.safetensors")
EXTRACT = ["extract_trajectories.py", "--ckpt", TEACHER, "--num-samples", "512", "--shard-size", "8",
           "--batch-size", "8", "--teacher-steps", "25", "--device", "cpu"]
SAMPLE = ["sample_ddp.py", "--ckpt", TEACHER, "--sampler", "ddim", "--num-sampling-steps", "25",
          "--num-fid-samples", "512", "--chunk-size", "8", "--per-proc-batch-size", "8", "--device", "cpu"]


def stop_and_rerun(argv, out, first_unit, log):
    """`python argv` stopped by SIGTERM once `first_unit` exists: exit status REQUEUE_EXIT_CODE and the units of
    work it kept; then the same command, to its end."""
    cmd = [sys.executable, *argv]
    proc = launch(cmd, log)
    wait_for(lambda: os.path.exists(first_unit), proc, log, os.path.basename(first_unit))
    proc.send_signal(signal.SIGTERM)
    assert finish(proc, log) == REQUEUE_EXIT_CODE, read(log)[-4000:]
    assert "stopped by SIGTERM" in read(log)
    kept = sorted(os.listdir(out))
    assert finish(launch(cmd, log), log) == 0, read(log)[-4000:]
    return kept


def test_extraction_stops_at_a_shard_boundary_and_the_same_command_completes_it(tmp_path):
    import extract_trajectories as et
    whole = str(tmp_path / "whole")
    et.main([*EXTRACT[1:], "--out", whole])
    out = str(tmp_path / "stopped")
    kept = stop_and_rerun([*EXTRACT, "--out", out], out, et.shard_path(out, 0), tmp_path / "log")
    shards = [f for f in kept if f.startswith("shard_")]
    assert 1 <= len(shards) < 64 and all(f.endswith(".safetensors") for f in shards), kept  # no partial shard
    for i in range(64):
        with open(et.shard_path(whole, i), "rb") as a, open(et.shard_path(out, i), "rb") as b:
            assert a.read() == b.read(), i


def test_sampling_stops_at_a_chunk_boundary_and_the_same_command_completes_it(tmp_path):
    import numpy as np
    import sample_ddp
    whole = str(tmp_path / "whole.npz")
    sample_ddp.main([*SAMPLE[1:], "--out", whole])
    out = str(tmp_path / "stopped.npz")
    parts = out[:-len(".npz")] + ".parts"
    kept = stop_and_rerun([*SAMPLE, "--out", out], parts, sample_ddp.chunk_path(parts, 0), tmp_path / "log")
    chunks = [f for f in kept if f.startswith("chunk_")]
    assert 1 <= len(chunks) < 64 and all(f.endswith(".npz") for f in chunks), kept
    a, b = np.load(whole), np.load(out)
    assert np.array_equal(a["arr_0"], b["arr_0"]) and np.array_equal(a["arr_1"], b["arr_1"])
