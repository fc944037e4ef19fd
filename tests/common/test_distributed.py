"""common/distributed.py: where a process's rank, local rank, world size and device come from."""

import json
import os
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from common.distributed import ONE_PROCESS, Distributed, _attempt_namespace, start_distributed
from tests.scripts.e2e import OP_BUILD_LINES

LAUNCH_VARIABLES = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def no_launcher(monkeypatch):
    for name in LAUNCH_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


def test_plain_python_without_deepspeed_is_one_process_and_changes_nothing(no_launcher):
    before = dict(os.environ)
    distributed = start_distributed(uses_deepspeed=False)
    assert distributed == ONE_PROCESS
    assert distributed.is_main and not distributed.accelerate_state_configured
    assert dict(os.environ) == before


def test_torchrun_identity_is_read_as_launched(no_launcher, monkeypatch):
    monkeypatch.setenv("RANK", "5")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "8")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    before = dict(os.environ)
    distributed = Distributed.launched()
    assert dict(os.environ) == before  # reading changes nothing
    assert (distributed.rank, distributed.local_rank, distributed.world_size, distributed.local_world_size) == (
        5, 1, 8, 4
    )
    assert not distributed.is_main and distributed.device == torch.device("cpu")


PROBE = """
import json, os
import torch
from accelerate import PartialState
from deepspeed import comm
from common.distributed import start_distributed

distributed = start_distributed(uses_deepspeed=True)
state = PartialState()
print(json.dumps({
    "shared_memory_op": comm.comm.cdb.shm_comm_op is not None,
    "env": {name: os.environ.get(name) for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR")},
    "identity": [distributed.rank, distributed.world_size, str(distributed.device)],
    "configured": distributed.accelerate_state_configured,
    "state": [str(state.distributed_type), state.backend, state.num_processes],
}))
"""


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU DeepSpeed path; GPU runs never take it")
def test_deepspeed_under_plain_python_gets_a_rendezvous_and_a_gloo_state():
    """In a subprocess: the start-up creates a process group, which must not leak into the test process. DeepSpeed's
    shared-memory op (inference only) is neither built nor probed for: no compiler or build line, no build time."""
    env = {key: value for key, value in os.environ.items() if key not in LAUNCH_VARIABLES}
    env.update(PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    probe = json.loads(done.stdout.strip().splitlines()[-1])
    assert probe["env"] == {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1"}
    assert probe["identity"] == [0, 1, "cpu"]
    assert probe["configured"] is True
    assert probe["state"] == ["DistributedType.DEEPSPEED", "gloo", 1]
    assert probe["shared_memory_op"] is False
    output = done.stdout + done.stderr
    assert not [line for line in OP_BUILD_LINES if line in output], output[-3000:]


FINISH_PROBE = """
import torch.distributed as dist
from common.distributed import start_distributed

distributed = start_distributed(uses_deepspeed=False)
assert distributed.gather(distributed.rank) == [0, 1]  # the group works
distributed.finished()
print("closed" if not dist.is_initialized() else "still open", flush=True)
"""


def run_under_torchrun(tmp_path, source: str, launch) -> subprocess.CompletedProcess:
    """`source` as a script under torchrun with two workers; `launch(port)`: the launcher's other flags, given a
    free port. It must succeed."""
    probe = tmp_path / "probe.py"
    probe.write_text(source)
    env = {key: value for key, value in os.environ.items() if key not in LAUNCH_VARIABLES}
    env.update(PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", *launch(port),
                           str(probe)], capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def test_finished_closes_the_process_group_of_a_torchrun_run(tmp_path):
    """Under torchrun (gloo, two processes): after `finished` no process group is left for the interpreter's exit."""
    done = run_under_torchrun(tmp_path, FINISH_PROBE, lambda port: [f"--master_port={port}"])
    assert done.stdout.count("closed") == 2 and "still open" not in done.stdout  # the ranks' lines may interleave


def test_a_restarted_attempt_meets_under_a_fresh_name_whatever_an_older_attempt_left_in_the_store():
    """torchrun's store outlives a crashed attempt: rank 0 may read rank 1's greeting of the older attempt first,
    and the older attempt's answer stays readable; the ranks still agree on a name of this attempt only."""
    store = dist.HashStore()
    store.set("phi3v/attempt/hello/1", "old greeting")
    store.set("phi3v/attempt/welcome/old greeting", "old attempt")
    store.set("phi3v/attempt/hello/2", "older greeting")

    def join(rank: int) -> str:
        time.sleep(0.2 * rank)  # rank 0 reads the old greetings before the new ones are written
        return _attempt_namespace(store, rank, world_size=3, poll_s=0.01)

    with ThreadPoolExecutor(3) as pool:
        names = set(pool.map(join, range(3)))
    with ThreadPoolExecutor(3) as pool:  # the next attempt, on the same store
        next_names = set(pool.map(join, range(3)))
    assert len(names) == 1 and len(next_names) == 1 and names != next_names
    assert all("old" not in name and name.startswith("phi3v/attempt/") for name in names | next_names)


RESTART_PROBE = """
import os, signal
from common.distributed import start_distributed

distributed = start_distributed(uses_deepspeed=False)
attempt = os.environ["TORCHELASTIC_RESTART_COUNT"]
print(f"attempt {attempt} rank {distributed.rank}: {distributed.gather(distributed.rank)}", flush=True)
if attempt == "0" and distributed.rank == 1:
    os.kill(os.getpid(), signal.SIGKILL)  # the other rank fails in its next collective, or torchrun stops it
distributed.barrier()
distributed.finished()
"""


@pytest.mark.slow
@pytest.mark.parametrize("rendezvous", ["static", "c10d"])
def test_the_workers_torchrun_restarts_form_their_process_group(tmp_path, rendezvous):
    """torchrun --max_restarts=1 (its default static rendezvous, and --rdzv_backend c10d): after rank 1 is killed, the
    restarted workers meet on the store the crashed attempt used, and form their group."""
    done = run_under_torchrun(tmp_path, RESTART_PROBE, lambda port: [
        "--max_restarts=1",
        *([f"--master_port={port}"] if rendezvous == "static" else [
            "--rdzv_backend=c10d", f"--rdzv_endpoint=127.0.0.1:{port}"]),
    ])
    for rank in (0, 1):
        assert f"attempt 1 rank {rank}: [0, 1]" in done.stdout, done.stdout
