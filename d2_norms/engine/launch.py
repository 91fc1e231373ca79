"""Multi-process launch: NCCL on CUDA through detectron2's launch, gloo on CPU.

Detectron2 v0.6's ``launch`` asserts CUDA and hard-codes NCCL, so ``--num-gpus 2`` cannot run on
a CPU machine. Here the backend follows the device: with CUDA available we hand over to
detectron2 (one process per GPU, NCCL); otherwise each "GPU" is a CPU process joined with gloo,
with the same rank layout, local process group and ``main_func(*args)`` contract.
"""
import logging
import os
import socket
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from detectron2.engine import launch as d2_launch
from detectron2.utils import comm

DEFAULT_TIMEOUT = timedelta(minutes=30)
logger = logging.getLogger(__name__)


def _free_local_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def choose_backend(num_gpus_per_machine: int) -> str:
    """'nccl' when this machine has CUDA devices for every process, else 'gloo' (CPU)."""
    if torch.cuda.is_available():
        if torch.cuda.device_count() < num_gpus_per_machine:
            raise ValueError(
                f"--num-gpus {num_gpus_per_machine} but this machine has "
                f"{torch.cuda.device_count()} CUDA device(s); lower --num-gpus "
                "(the batch per GPU stays what the config says; see SOLVER.REFERENCE_WORLD_SIZE)"
            )
        return "nccl"
    return "gloo"


def launch(main_func, num_gpus_per_machine: int, num_machines: int = 1, machine_rank: int = 0,
           dist_url=None, args=(), timeout=DEFAULT_TIMEOUT, backend=None):
    """Run ``main_func(*args)`` in ``num_gpus_per_machine`` processes on each of ``num_machines``.

    ``backend``: None picks NCCL with CUDA, gloo without. ``dist_url="auto"`` picks a free local
    port (single machine only), as in detectron2.
    """
    if num_gpus_per_machine < 1 or num_machines < 1:
        raise ValueError(f"--num-gpus ({num_gpus_per_machine}) and --num-machines "
                         f"({num_machines}) must be >= 1")
    if not 0 <= machine_rank < num_machines:
        raise ValueError(f"--machine-rank {machine_rank} must be in [0, {num_machines})")
    backend = backend or choose_backend(num_gpus_per_machine)
    world_size = num_machines * num_gpus_per_machine
    if backend == "nccl":
        return d2_launch(main_func, num_gpus_per_machine, num_machines, machine_rank,
                         dist_url, args, timeout)
    if world_size == 1:
        return main_func(*args)
    if dist_url in (None, "auto"):
        if num_machines > 1:
            raise ValueError("--dist-url auto only works on one machine; give tcp://HOST:PORT "
                             "of machine 0, reachable from every machine")
        dist_url = f"tcp://127.0.0.1:{_free_local_port()}"
    mp.spawn(
        _gloo_worker,
        nprocs=num_gpus_per_machine,
        args=(main_func, world_size, num_gpus_per_machine, machine_rank, dist_url, args, timeout),
        daemon=False,
    )


def _gloo_worker(local_rank, main_func, world_size, num_gpus_per_machine, machine_rank,
                 dist_url, args, timeout):
    global_rank = machine_rank * num_gpus_per_machine + local_rank
    # Share the machine's cores between the local processes instead of oversubscribing.
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // num_gpus_per_machine))
    try:
        dist.init_process_group(backend="gloo", init_method=dist_url, world_size=world_size,
                                rank=global_rank, timeout=timeout)
    except Exception:
        logger.error("Could not join the gloo process group at %s", dist_url)
        raise
    assert comm._LOCAL_PROCESS_GROUP is None
    num_machines = world_size // num_gpus_per_machine
    for i in range(num_machines):
        ranks = list(range(i * num_gpus_per_machine, (i + 1) * num_gpus_per_machine))
        group = dist.new_group(ranks)
        if i == machine_rank:
            comm._LOCAL_PROCESS_GROUP = group
    comm.synchronize()
    try:
        main_func(*args)
    finally:
        dist.destroy_process_group()
