"""Where rank, local rank, world size and device come from: `start_distributed`, called once per run.

torchrun sets RANK, LOCAL_RANK and WORLD_SIZE; `python SCRIPT` is a world of one process. The start-up
step below is the only code that touches that environment or accelerate's process state; everything
else (the run, the benchmark, evaluation sharding, model placement, batch-size checks) reads the frozen
`Distributed` it returns.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass

import torch
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

    @property
    def is_main(self) -> bool:
        return self.rank == 0


ONE_PROCESS = Distributed(rank=0, local_rank=0, world_size=1, local_world_size=1, device=torch.device("cpu"))  # no launcher, no GPU


def launched_world_size() -> int:
    """Processes the launcher started (torchrun's WORLD_SIZE; 1 for `python SCRIPT`)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def launched_local_rank() -> int:
    """This process's GPU index on its node as the launcher assigned it (0 for `python SCRIPT`); for checks that
    run before `start_distributed` (the GPU's capabilities while the flags are resolved)."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def start_distributed(uses_deepspeed: bool) -> Distributed:
    """Prepare this process for the Trainer and return its place in the run.

    `python SCRIPT` under DeepSpeed or on a GPU gets a single-process rendezvous; without a GPU, DeepSpeed
    runs get accelerate's state on gloo. The process group itself is started by the Trainer's arguments.
    """
    cuda = torch.cuda.is_available()
    if (uses_deepspeed or cuda) and "RANK" not in os.environ:
        _single_process_rendezvous()
    configured = not cuda and (uses_deepspeed or launched_world_size() > 1)
    if configured:
        _cpu_process_state(uses_deepspeed)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    return Distributed(
        rank=int(os.environ.get("RANK", "0")),
        local_rank=local_rank,
        world_size=launched_world_size(),
        local_world_size=int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", "1"))),
        device=torch.device("cuda", local_rank) if cuda else torch.device("cpu"),
        accelerate_state_configured=configured,
    )


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
    previous = os.environ.get("ACCELERATE_USE_DEEPSPEED")
    os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"  # what TrainingArguments sets while it builds the state
    try:
        PartialState(backend="gloo")
    finally:
        if previous is None:
            del os.environ["ACCELERATE_USE_DEEPSPEED"]
        else:
            os.environ["ACCELERATE_USE_DEEPSPEED"] = previous
