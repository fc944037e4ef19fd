"""A process's place in the run — rank, local rank, world size, device — and everything done across ranks.

torchrun sets RANK, LOCAL_RANK and WORLD_SIZE; `python SCRIPT` is a world of one process. `Distributed.launched`
reads them once, before the flags are resolved (the batch-size check needs the world size, the precision
checks this process's GPU); `Distributed.started` then prepares the process for the Trainer. This module is the
only code that reads that environment or touches accelerate's process state, and the only one that calls
`torch.distributed`: checkpoints, preemption and evaluation barrier, gather and agree through `Distributed`.
"""

from __future__ import annotations

import dataclasses
import os
import socket
from dataclasses import dataclass

import torch
import torch.distributed as dist
from accelerate import PartialState


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
        """Prepare this process for the Trainer; the same place in the run, with what the preparation set up.

        `python SCRIPT` under DeepSpeed or on a GPU gets a single-process rendezvous; without a GPU, DeepSpeed
        runs and multi-process runs get accelerate's state on gloo. The process group itself is started by the
        Trainer's arguments.
        """
        cuda = self.device.type == "cuda"
        if (uses_deepspeed or cuda) and "RANK" not in os.environ:
            _single_process_rendezvous()
        configured = not cuda and (uses_deepspeed or self.world_size > 1)
        if configured:
            _cpu_process_state(uses_deepspeed)
        return dataclasses.replace(self, accelerate_state_configured=configured)

    def joined(self) -> Distributed:
        """For work without the Trainer (predict.py): under torchrun, join the ranks' process group, which a GPU run
        otherwise gets from the Trainer's arguments (`started` gives CPU runs theirs)."""
        if self.world_size > 1 and not (dist.is_available() and dist.is_initialized()):
            torch.cuda.set_device(self.device)
            dist.init_process_group("nccl", device_id=self.device)
        return self

    @property
    def _in_process_group(self) -> bool:
        return self.world_size > 1 and dist.is_available() and dist.is_initialized()

    def barrier(self) -> None:
        """Wait for every rank (nothing to wait for in a world of one)."""
        if self._in_process_group:
            dist.barrier()

    def gather(self, value) -> list:
        """Every rank's `value` (picklable), in rank order, on every rank; every rank must call it (within the
        process group, which the Trainer's arguments start)."""
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


ONE_PROCESS = Distributed(rank=0, local_rank=0, world_size=1, local_world_size=1, device=torch.device("cpu"))  # no launcher, no GPU


def start_distributed(uses_deepspeed: bool) -> Distributed:
    """This process as launched, prepared for the Trainer (for code that resolves no flags first: the
    benchmark's workers, tests)."""
    return Distributed.launched().started(uses_deepspeed)


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
    gloo first; the Trainer's arguments then use it. GPU runs never come here."""
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
