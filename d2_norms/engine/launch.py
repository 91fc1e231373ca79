"""Multi-process launch: NCCL on CUDA through detectron2's launch, gloo on CPU, or joining the
process group of an external launcher (torchrun, or a scheduler that sets the same variables).

Detectron2 v0.6's ``launch`` asserts CUDA and hard-codes NCCL, so ``--num-gpus 2`` cannot run on
a CPU machine. Here the backend follows the device: with CUDA available we hand over to
detectron2 (one process per GPU, NCCL); otherwise each "GPU" is a CPU process joined with gloo,
with the same rank layout, local process group and ``main_func(*args)`` contract.

Under ``torchrun`` (detected from ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``/``LOCAL_WORLD_SIZE``,
see :func:`launcher_environment`) the processes already exist: :func:`launch` joins the
launcher's group (``MASTER_ADDR``/``MASTER_PORT``) in this process instead of spawning, with the
same backend rule, local process group and core sharing as ``--num-gpus``. The process flags
then only have to agree with the launcher (:func:`check_launch_flags`); ``None`` means "not
given" (see :func:`let_launcher_decide`).
"""
import logging
import os
import pickle
import socket
from dataclasses import dataclass
from datetime import timedelta
from typing import Mapping, Optional

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from detectron2.engine import launch as d2_launch
from detectron2.utils import comm

from d2_norms import compat

from .errors import DistributedSetupError

DEFAULT_TIMEOUT = timedelta(minutes=30)
logger = logging.getLogger(__name__)

# Variables whose presence means "an external launcher started this process as one rank".
LAUNCHER_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK")


def _free_local_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def choose_backend(num_gpus_per_machine: int, what: Optional[str] = None) -> str:
    """'nccl' when this machine has CUDA devices for every process, else 'gloo' (CPU).
    ``what``: how the user asked for that many processes (for the error message)."""
    if torch.cuda.is_available():
        if torch.cuda.device_count() < num_gpus_per_machine:
            what = what or f"--num-gpus {num_gpus_per_machine}"
            raise DistributedSetupError(
                f"{what} but this machine has {torch.cuda.device_count()} CUDA device(s); "
                "start at most one process per GPU (the batch per GPU stays what the config "
                "says; see SOLVER.REFERENCE_WORLD_SIZE)"
            )
        return "nccl"
    return "gloo"


def share_cpu_cores(processes_per_machine: int) -> None:
    """Give each of the machine's CPU processes its share of the cores instead of letting every
    process use them all (oversubscription). The same rule for --num-gpus and torchrun, so that
    both run the same kernels with the same thread counts."""
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // processes_per_machine))


def setup_local_process_group(num_workers_per_machine: int) -> None:
    """detectron2's per-machine process group; the version difference lives in d2_norms.compat."""
    compat.create_local_process_group(num_workers_per_machine)


# ------------------------------------------------------------------------------------------------
# An external launcher's environment (torchrun, or a scheduler setting the same variables).
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LauncherEnvironment:
    """This process's place in a job started by an external launcher."""

    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    machine_rank: int  # torchrun's GROUP_RANK (rank of this machine's group of processes)
    master_addr: Optional[str]
    master_port: Optional[int]
    launcher: str  # "torchrun" (TORCHELASTIC_RUN_ID is set) or "environment"

    @property
    def num_machines(self) -> int:
        return self.world_size // self.local_world_size

    @property
    def dist_url(self) -> str:
        return f"tcp://{self.master_addr}:{self.master_port}"


_HOW_TO_FIX = ("torchrun sets RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR and "
               "MASTER_PORT for every process; a scheduler starting the processes itself must "
               "set the same. Without a launcher, unset them and use --num-gpus.")


def launcher_environment(environ: Optional[Mapping[str, str]] = None
                         ) -> Optional[LauncherEnvironment]:
    """The launcher's description of this process, or None when no launcher started it (none of
    ``LAUNCHER_VARIABLES`` is set). Raises :class:`DistributedSetupError` for a partial or
    inconsistent environment, naming the variables."""
    env = os.environ if environ is None else environ
    present = [name for name in LAUNCHER_VARIABLES if name in env]
    if not present:
        return None

    def integer(name: str, default: Optional[int] = None) -> int:
        if name not in env:
            if default is not None:
                return default
            raise DistributedSetupError(
                f"the launcher's environment is incomplete: {', '.join(present)} "
                f"{'is' if len(present) == 1 else 'are'} set but {name} is not. {_HOW_TO_FIX}")
        try:
            return int(env[name])
        except ValueError:
            raise DistributedSetupError(
                f"{name}={env[name]!r} in the environment is not an integer. {_HOW_TO_FIX}"
            ) from None

    state = "; ".join(f"{n}={env[n]}" for n in LAUNCHER_VARIABLES if n in env)
    world_size = integer("WORLD_SIZE")
    rank = integer("RANK")
    single = world_size == 1
    local_rank = integer("LOCAL_RANK", 0 if single else None)
    local_world_size = integer("LOCAL_WORLD_SIZE", 1 if single else None)
    if world_size < 1 or not 0 <= rank < world_size:
        raise DistributedSetupError(f"RANK must be in [0, WORLD_SIZE) and WORLD_SIZE >= 1; the "
                                    f"environment has {state}")
    if local_world_size < 1 or not 0 <= local_rank < local_world_size:
        raise DistributedSetupError(f"LOCAL_RANK must be in [0, LOCAL_WORLD_SIZE) and "
                                    f"LOCAL_WORLD_SIZE >= 1; the environment has {state}")
    if world_size % local_world_size:
        raise DistributedSetupError(
            f"WORLD_SIZE={world_size} is not a multiple of LOCAL_WORLD_SIZE={local_world_size}: "
            "every machine must run the same number of processes (torchrun --nproc_per_node N "
            "on every machine).")
    if rank % local_world_size != local_rank:
        raise DistributedSetupError(
            f"RANK={rank} is not machine_rank * LOCAL_WORLD_SIZE + LOCAL_RANK ({state}): each "
            "machine's processes must hold consecutive ranks (as torchrun assigns them), which "
            "detectron2's per-machine process group assumes.")
    machine_rank = integer("GROUP_RANK", rank // local_world_size)
    if machine_rank != rank // local_world_size:
        raise DistributedSetupError(
            f"GROUP_RANK={machine_rank} does not match RANK // LOCAL_WORLD_SIZE = "
            f"{rank // local_world_size} ({state}); this layout is not supported.")
    addr, port = env.get("MASTER_ADDR"), env.get("MASTER_PORT")
    if not single:
        missing = [n for n in ("MASTER_ADDR", "MASTER_PORT") if not env.get(n)]
        if missing:
            raise DistributedSetupError(
                f"{' and '.join(missing)} not set: the processes cannot find each other "
                f"(WORLD_SIZE={world_size}). {_HOW_TO_FIX}")
        if not port.isdigit() or not 0 < int(port) < 65536:
            raise DistributedSetupError(f"MASTER_PORT={port!r} is not a TCP port number")
    return LauncherEnvironment(
        rank=rank, world_size=world_size, local_rank=local_rank,
        local_world_size=local_world_size, machine_rank=machine_rank, master_addr=addr,
        master_port=int(port) if port and port.isdigit() else None,
        launcher="torchrun" if "TORCHELASTIC_RUN_ID" in env else "environment")


def check_launch_flags(env: LauncherEnvironment, num_gpus_per_machine=None, num_machines=None,
                       machine_rank=None, dist_url=None) -> None:
    """Under a launcher, the launcher decides the processes: a flag that was given (not None)
    must say the same, else it is refused (ignoring it would silently run another layout than
    the command line says)."""
    drop = "drop the flag: under torchrun the launcher decides"
    if num_gpus_per_machine is not None and num_gpus_per_machine != env.local_world_size:
        raise DistributedSetupError(
            f"--num-gpus {num_gpus_per_machine}, but the launcher started "
            f"LOCAL_WORLD_SIZE={env.local_world_size} process(es) on this machine; {drop} "
            f"(torchrun --nproc_per_node {num_gpus_per_machine} for {num_gpus_per_machine} "
            "processes per machine).")
    if num_machines is not None and num_machines != env.num_machines:
        raise DistributedSetupError(
            f"--num-machines {num_machines}, but the launcher's WORLD_SIZE={env.world_size} / "
            f"LOCAL_WORLD_SIZE={env.local_world_size} = {env.num_machines} machine(s); {drop} "
            "(torchrun --nnodes).")
    if machine_rank is not None and machine_rank != env.machine_rank:
        raise DistributedSetupError(
            f"--machine-rank {machine_rank}, but the launcher made this machine number "
            f"{env.machine_rank} (GROUP_RANK); {drop} (torchrun --node_rank).")
    if dist_url is not None and (env.world_size == 1 or dist_url != env.dist_url):
        raise DistributedSetupError(
            f"--dist-url {dist_url}, but the launcher's rendezvous is MASTER_ADDR:MASTER_PORT "
            f"({env.master_addr}:{env.master_port}); {drop} (torchrun --master_addr / "
            "--master_port or --rdzv_endpoint).")


def let_launcher_decide(parser) -> None:
    """Turn detectron2's process flags (--num-gpus, --num-machines, --machine-rank, --dist-url)
    into "not given" (None) by default, so that :func:`launch` can tell a flag the user typed,
    which must agree with torchrun, from a default. Without a launcher None means 1, 1, 0 and a
    free local port, as before."""
    defaults = {"num_gpus": "1", "num_machines": "1", "machine_rank": "0",
                "dist_url": "a free local port on one machine"}
    for action in parser._actions:
        if action.dest in defaults:
            action.default = None
            action.help = (f"{action.help or ''} (default: {defaults[action.dest]}; under "
                           "torchrun: what the launcher set, and a value given must agree)")


# ------------------------------------------------------------------------------------------------
# Launch.
# ------------------------------------------------------------------------------------------------
def launch(main_func, num_gpus_per_machine: Optional[int] = None,
           num_machines: Optional[int] = None, machine_rank: Optional[int] = None,
           dist_url=None, args=(), timeout=DEFAULT_TIMEOUT, backend=None):
    """Run ``main_func(*args)`` in ``num_gpus_per_machine`` processes on each of ``num_machines``,
    or, when an external launcher started this process (:func:`launcher_environment`), in this
    process as one rank of the launcher's group.

    ``None`` arguments mean "not given": 1 process, 1 machine, machine 0, ``dist_url="auto"``
    (a free local port, single machine only) without a launcher; the launcher's values under
    one (given values must agree, :func:`check_launch_flags`). ``backend``: None picks NCCL
    with CUDA, gloo without.
    """
    env = launcher_environment()
    if env is not None:
        check_launch_flags(env, num_gpus_per_machine, num_machines, machine_rank, dist_url)
        return _run_as_launcher_rank(env, main_func, args, timeout, backend)

    num_gpus_per_machine = 1 if num_gpus_per_machine is None else num_gpus_per_machine
    num_machines = 1 if num_machines is None else num_machines
    machine_rank = 0 if machine_rank is None else machine_rank
    if num_gpus_per_machine < 1 or num_machines < 1:
        raise DistributedSetupError(f"--num-gpus ({num_gpus_per_machine}) and --num-machines "
                                    f"({num_machines}) must be >= 1")
    if not 0 <= machine_rank < num_machines:
        raise DistributedSetupError(
            f"--machine-rank {machine_rank} must be in [0, {num_machines})")
    world_size = num_machines * num_gpus_per_machine
    if world_size == 1:
        return main_func(*args)
    if dist_url in (None, "auto") and num_machines > 1:
        raise DistributedSetupError(
            "--dist-url auto (the default) only works on one machine; give tcp://HOST:PORT of "
            "machine 0, reachable from every machine (or launch with torchrun)")
    backend = backend or choose_backend(num_gpus_per_machine)
    if backend == "nccl":
        return d2_launch(main_func, num_gpus_per_machine, num_machines, machine_rank,
                         dist_url or "auto", args, timeout)
    if dist_url in (None, "auto"):
        dist_url = f"tcp://127.0.0.1:{_free_local_port()}"
    mp.spawn(
        _gloo_worker,
        nprocs=num_gpus_per_machine,
        args=(main_func, world_size, num_gpus_per_machine, machine_rank, dist_url, args, timeout),
        daemon=False,
    )


def _run_as_launcher_rank(env: LauncherEnvironment, main_func, args, timeout, backend):
    """Join the launcher's process group as ``env.rank`` and run ``main_func(*args)`` here."""
    if env.world_size == 1:  # torchrun --nproc_per_node 1 on one machine: a plain process
        logger.info("%s launcher with WORLD_SIZE=1: running as a single process", env.launcher)
        return main_func(*args)
    backend = backend or choose_backend(
        env.local_world_size, what=f"the launcher started LOCAL_WORLD_SIZE="
                                   f"{env.local_world_size} processes on this machine")
    if backend == "nccl":
        torch.cuda.set_device(env.local_rank)  # before any CUDA work: one GPU per local rank
    else:
        share_cpu_cores(env.local_world_size)
    try:
        dist.init_process_group(backend=backend, init_method="env://",
                                world_size=env.world_size, rank=env.rank, timeout=timeout)
    except Exception:
        logger.error("Could not join the %s process group at MASTER_ADDR:MASTER_PORT = %s:%s",
                     backend, env.master_addr, env.master_port)
        raise
    try:
        setup_local_process_group(env.local_world_size)
        comm.synchronize()
        result = main_func(*args)
        _meet_before_teardown()
        return result
    finally:
        dist.destroy_process_group()


def _gloo_worker(local_rank, main_func, world_size, num_gpus_per_machine, machine_rank,
                 dist_url, args, timeout):
    global_rank = machine_rank * num_gpus_per_machine + local_rank
    share_cpu_cores(num_gpus_per_machine)
    try:
        dist.init_process_group(backend="gloo", init_method=dist_url, world_size=world_size,
                                rank=global_rank, timeout=timeout)
    except Exception:
        logger.error("Could not join the gloo process group at %s", dist_url)
        raise
    setup_local_process_group(num_gpus_per_machine)
    comm.synchronize()
    try:
        main_func(*args)
        _meet_before_teardown()
    finally:
        dist.destroy_process_group()


def _meet_before_teardown():
    """Barrier after a successful ``main_func`` on every rank, before the group is destroyed:
    a rank destroying it while another still runs gloo work has aborted at exit (SIGABRT,
    "terminate called without an active exception"), under mp.spawn and under torchrun."""
    comm.synchronize()


# ------------------------------------------------------------------------------------------------
# Work done once for all ranks.
# ------------------------------------------------------------------------------------------------
def _shareable(error: BaseException) -> BaseException:
    """``error`` itself when it survives pickling (all d2_norms input errors do), else a
    RuntimeError carrying its type and message."""
    try:
        return pickle.loads(pickle.dumps(error))
    except Exception:
        return RuntimeError(f"{type(error).__name__} on rank 0: {error}")


def run_on_main_process(func, *args, **kwargs):
    """Run ``func`` on rank 0 only, while the other ranks wait; if it raised, every rank raises
    the same error, so that all processes stop together with the same message. Returns func's
    result on rank 0, None elsewhere. Used for checks that read or create shared files (dataset
    generation, weight files): done once, no races. Every rank must call it."""
    if comm.get_world_size() == 1:
        return func(*args, **kwargs)
    result, error = None, None
    if comm.is_main_process():
        try:
            result = func(*args, **kwargs)
        except Exception as e:  # shared below, then re-raised with its traceback here
            error = e
    shared = comm.all_gather(_shareable(error) if error is not None else None)[0]
    if error is not None:
        raise error
    if shared is not None:
        raise shared
    return result
