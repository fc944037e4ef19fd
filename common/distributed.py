"""A process's place in the run — rank, local rank, world size, device — and everything done across ranks.

torchrun sets RANK, LOCAL_RANK and WORLD_SIZE; `python SCRIPT` is a world of one process. `Distributed.launched`
reads them once, before the flags are resolved (the batch-size check needs the world size, the precision
checks this process's GPU); `Distributed.started` then forms the process group and prepares the process for the
Trainer. This module is the only code that reads that environment or touches accelerate's process state, and the
only one that calls `torch.distributed`: checkpoints, preemption, evaluation and the benchmark barrier, gather and
agree through `Distributed`.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import socket
import time
import uuid
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from accelerate import PartialState

logger = logging.getLogger(__name__)

# How long a rank waits for the others, at the rendezvous and in a collective (the Trainer's default ddp_timeout):
# rank 0 alone writes the final model and the merged one while the others wait.
PROCESS_GROUP_TIMEOUT = timedelta(minutes=30)
_ATTEMPT_KEYS = "phi3v/attempt"


@dataclass(frozen=True)
class Distributed:
    rank: int  # global rank: 0 writes the shared files
    local_rank: int  # the GPU index on this node
    world_size: int  # processes in the run
    local_world_size: int  # processes on this node
    device: torch.device
    # accelerate's process state was set up here (CPU DeepSpeed): TrainingArguments must use it as it is
    accelerate_state_configured: bool = False

    @classmethod
    def launched(cls) -> Distributed:
        """This process as the launcher started it (a world of one for `python SCRIPT`); nothing is changed."""
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        return cls(
            rank=int(os.environ.get("RANK", "0")),
            local_rank=local_rank,
            world_size=world_size,
            local_world_size=int(os.environ.get("LOCAL_WORLD_SIZE", world_size)),
            device=torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu"),
        )

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def started(self, uses_deepspeed: bool) -> Distributed:
        """Form the run's process group and prepare this process for the Trainer; the same place in the run, with
        what the preparation set up. The one place a process group is created (training, the benchmark's workers,
        predict.py), in a way that a restarted torchrun attempt can repeat (`_form_process_group`).

        `python SCRIPT` under DeepSpeed or on a GPU gets a world of one (DeepSpeed needs a process group even then;
        several GPUs would otherwise get nn.DataParallel); without a GPU, DeepSpeed runs and multi-process runs get
        accelerate's state on gloo, on this group.
        """
        cuda = self.device.type == "cuda"
        if (uses_deepspeed or cuda) and "RANK" not in os.environ:
            _single_process_rendezvous()
        if "RANK" in os.environ and not dist.is_initialized():
            _form_process_group(self)
        configured = not cuda and (uses_deepspeed or self.world_size > 1)
        if configured:
            _cpu_process_state(uses_deepspeed)
        return dataclasses.replace(self, accelerate_state_configured=configured)

    @property
    def _in_process_group(self) -> bool:
        return self.world_size > 1 and dist.is_available() and dist.is_initialized()

    def barrier(self) -> None:
        """Wait for every rank (nothing to wait for in a world of one)."""
        if self._in_process_group:
            dist.barrier()

    def gather(self, value) -> list:
        """Every rank's `value` (picklable), in rank order, on every rank; every rank must call it (within the
        process group that `started` forms)."""
        if self.world_size == 1:
            return [value]
        gathered = [None] * self.world_size
        dist.all_gather_object(gathered, value)
        return gathered

    def finished(self) -> None:
        """Leave the run together: wait for every rank, then close the process group. A torchrun worker that exits
        with its gloo group open can abort while the interpreter shuts down ("terminate called without an
        active exception": the group's threads outlive it), turning a finished run into a failed one."""
        if self._in_process_group:
            dist.barrier()
            dist.destroy_process_group()

    def agree_max(self, value: int) -> int:
        """The largest of every rank's `value`, the same on every rank; every rank must call it."""
        if not self._in_process_group:
            return value
        tensor = torch.tensor([value], dtype=torch.int64, device=self.device)
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
        return int(tensor.item())

    def all_max(self, values: list[float]) -> list[float]:
        """Each of `values`, the largest over every rank, the same on every rank; every rank must call it."""
        return [max(column) for column in zip(*self.gather(values), strict=True)]


ONE_PROCESS = Distributed(rank=0, local_rank=0, world_size=1, local_world_size=1, device=torch.device("cpu"))  # no launcher, no GPU


def start_distributed(uses_deepspeed: bool) -> Distributed:
    """This process as launched, prepared for the Trainer (for code that resolves no flags first: the
    benchmark's workers, tests)."""
    return Distributed.launched().started(uses_deepspeed)


def _form_process_group(distributed: Distributed) -> None:
    """The default process group (nccl on a GPU, gloo otherwise) on the launcher's store (torchrun's, or one rank 0
    hosts at MASTER_ADDR:MASTER_PORT), in a key space of this attempt's own (`_attempt_namespace`)."""
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if world_size == 1:
        store = dist.HashStore()  # nobody to meet
    else:
        store, _, _ = next(dist.rendezvous("env://", timeout=PROCESS_GROUP_TIMEOUT))
        store = dist.PrefixStore(_attempt_namespace(store, rank, world_size), store)
    cuda = distributed.device.type == "cuda"
    if cuda:
        torch.cuda.set_device(distributed.device)
    dist.init_process_group("nccl" if cuda else "gloo", store=store, rank=rank, world_size=world_size,
                            timeout=PROCESS_GROUP_TIMEOUT, device_id=distributed.device if cuda else None)
    restart = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    if rank == 0 and restart != "0":
        logger.info("torchrun restart %s: the process group of %d processes is formed", restart, world_size)


def _attempt_namespace(store: dist.Store, rank: int, world_size: int, poll_s: float = 0.05) -> str:
    """A key prefix of this attempt's own, the same on every rank (every rank must call it).

    torchrun's workers share the agent's store across restarts (`--max_restarts`): the keys a crashed attempt left
    there (its ranks' gloo addresses, NCCL's unique id) would be read by the restarted workers, which then fail to
    connect or hang (pytorch issue #135712). torchrun's restart count cannot tell attempts apart: each node's agent
    counts its own. So rank 0 names the attempt with a fresh token and hands it to each rank in answer to that
    rank's own fresh token: no rank can read an older attempt's answer, and rank 0 goes on answering until each rank
    confirms under the new name (an older attempt's greeting may be read first).
    """
    mine = uuid.uuid4().hex
    if rank != 0:
        store.set(f"{_ATTEMPT_KEYS}/hello/{rank}", mine)
        attempt = store.get(f"{_ATTEMPT_KEYS}/welcome/{mine}").decode()
        store.set(f"{_ATTEMPT_KEYS}/{attempt}/joined/{rank}", "1")
        return f"{_ATTEMPT_KEYS}/{attempt}/"
    deadline = time.monotonic() + store.timeout.total_seconds()
    waiting = list(range(1, world_size))
    while waiting:
        for peer in waiting:
            store.set(f"{_ATTEMPT_KEYS}/welcome/{store.get(f'{_ATTEMPT_KEYS}/hello/{peer}').decode()}", mine)
        waiting = [peer for peer in waiting if not store.check([f"{_ATTEMPT_KEYS}/{mine}/joined/{peer}"])]
        if waiting and time.monotonic() > deadline:
            raise RuntimeError(f"ranks {waiting} did not join the process group within {store.timeout}")
        time.sleep(poll_s if waiting else 0)
    return f"{_ATTEMPT_KEYS}/{mine}/"


def _single_process_rendezvous() -> None:
    """A world of one process on a free local port: DeepSpeed needs a process group even then (it would look
    for MPI), and on a machine with several GPUs the Trainer would otherwise wrap the model in
    nn.DataParallel, which splits pixel_values apart from their prompts."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))


def _cpu_process_state(uses_deepspeed: bool) -> None:
    """Without a GPU, the Trainer's arguments would give accelerate no backend and count one process: under
    torchrun every rank would train alone (no DDP; DeepSpeed also rejects the batch size). Set the state up on
    the gloo group first; the Trainer's arguments then use it. GPU runs never come here."""
    if not uses_deepspeed:
        PartialState(cpu=True, backend="gloo")
        return
    _skip_shared_memory_op()
    previous = os.environ.get("ACCELERATE_USE_DEEPSPEED")
    os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"  # what TrainingArguments sets while it builds the state
    try:
        PartialState(backend="gloo")
    finally:
        if previous is None:
            del os.environ["ACCELERATE_USE_DEEPSPEED"]
        else:
            os.environ["ACCELERATE_USE_DEEPSPEED"] = previous


def _skip_shared_memory_op() -> None:
    """DeepSpeed's CPU backend builds its shared-memory collective op (`deepspeed_shm_comm`, C++) when its process
    group starts: compiler lines in every run and half a minute or more of compiling in the first. Only DeepSpeed's
    inference all-reduce (tensor parallelism) uses it, never ZeRO training, so it is declared unbuildable: DeepSpeed
    builds it only when `deepspeed.ops.__compatible_ops__` says it can, and keeps that dict for the process (it
    probes every op, with more compiler lines, only when nothing set it first). GPU runs never build it."""
    import deepspeed.ops
    from deepspeed.ops.op_builder.cpu import ShareMemCommBuilder

    vars(deepspeed.ops).setdefault("__compatible_ops__", {})[ShareMemCommBuilder.NAME] = False
