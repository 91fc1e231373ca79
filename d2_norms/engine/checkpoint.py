"""Checkpoints that survive a kill at any moment, and everything a resumed run needs to continue
exactly where the killed one was.

* :class:`AtomicCheckpointer` writes each checkpoint to a hidden temporary file in the same
  directory, fsyncs it and renames it into place (``os.replace`` is atomic on POSIX), and only
  then rewrites the ``last_checkpoint`` pointer the same way. A SIGKILL leaves either the old
  state or the new one, never a pointer naming a half-written file. Leftover temporary files of a
  killed writer are removed when training starts again. If the pointer names a file that is
  missing or incomplete anyway (written by another tool, a damaged disk), resuming falls back to
  the newest complete checkpoint and says so.
* :func:`capture_rng_state` / :func:`restore_rng_state`: torch (CPU and the current CUDA
  device), numpy and python ``random`` states, stored in weights-only-loadable form.
* :class:`CheckpointHook` replaces detectron2's PeriodicCheckpointer hook. It runs in every
  process: at a checkpoint iteration all processes first agree that the weights are finite
  (a NaN model is never saved over the last good one) and gather their RNG states, then the
  main process saves.
"""
import logging
import os
import random
import re
import zipfile
from typing import Any, Dict, List, Optional

import numpy as np
import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.engine.train_loop import HookBase
from detectron2.utils import comm

from d2_norms.fileio import atomic_write_bytes

logger = logging.getLogger("d2_norms.checkpoint")

POINTER = "last_checkpoint"
_TMP_RE = re.compile(r"^\..+\.tmp-\d+$")


def is_complete_checkpoint(path: str) -> bool:
    """True if ``path`` is a whole ``torch.save`` file: torch writes a zip archive whose central
    directory comes last, so a truncated file fails this check without being loaded."""
    try:
        return os.path.getsize(path) > 0 and zipfile.is_zipfile(path)
    except OSError:
        return False


def remove_stale_temp_files(directory: str) -> List[str]:
    """Delete temporary files a killed writer left in ``directory``; returns their names."""
    removed = []
    if not directory or not os.path.isdir(directory):
        return removed
    for name in os.listdir(directory):
        if _TMP_RE.match(name):
            try:
                os.unlink(os.path.join(directory, name))
                removed.append(name)
            except FileNotFoundError:
                pass
    if removed:
        logger.warning("Removed temporary files left by an interrupted checkpoint write in %s: "
                       "%s", directory, ", ".join(removed))
    return removed


class AtomicCheckpointer(DetectionCheckpointer):
    """DetectionCheckpointer whose files and ``last_checkpoint`` pointer are written atomically
    (see the module docstring). Same constructor and API."""

    #: ``d2_norms.config_checks.norm_record(cfg)`` of the model, saved with every checkpoint
    #: (under ``NORM_RECORD``) so that loading it into another normalizer's model is refused.
    record = None

    def save(self, name: str, **kwargs: Any) -> None:
        if not self.save_dir or not self.save_to_disk:
            return
        from d2_norms.config_checks import NORM_RECORD

        data = {"model": self.model.state_dict()}
        for key, obj in self.checkpointables.items():
            data[key] = obj.state_dict()
        data.update(kwargs)
        if self.record is not None:
            data.setdefault(NORM_RECORD, self.record)
        basename = f"{name}.pth"
        save_file = os.path.join(self.save_dir, basename)
        self.logger.info("Saving checkpoint to %s", save_file)
        atomic_write_bytes(save_file, lambda f: torch.save(data, f))
        # Only a complete file may be named by the pointer.
        self.tag_last_checkpoint(basename)

    #: (path, checkpoint dict) already read by the caller (e.g. to check its keys): the next
    #: load of that path uses it instead of reading the file again.
    preloaded = None

    def _load_file(self, filename):
        if self.preloaded is not None:
            path, data = self.preloaded
            self.preloaded = None
            if os.path.abspath(path) == os.path.abspath(filename):
                return data
        return super()._load_file(filename)

    def tag_last_checkpoint(self, last_filename_basename: str) -> None:
        path = os.path.join(self.save_dir, POINTER)
        atomic_write_bytes(path, lambda f: f.write(last_filename_basename.encode()))

    def _complete_checkpoints_newest_first(self) -> List[str]:
        files = [f for f in self.get_all_checkpoint_files() if is_complete_checkpoint(f)]
        return sorted(files, key=lambda f: os.path.getmtime(f), reverse=True)

    def get_checkpoint_file(self) -> str:
        """The file ``last_checkpoint`` names if it is complete; otherwise the newest complete
        checkpoint in the directory (with a warning), or "" if there is none."""
        named = super().get_checkpoint_file()
        if named and is_complete_checkpoint(named):
            return named
        fallback = self._complete_checkpoints_newest_first()
        problem = ("does not exist" if named and not os.path.exists(named) else
                   "is incomplete (truncated)" if named else "cannot be read")
        if fallback:
            self.logger.warning(
                "%s names %s, which %s; resuming from the newest complete checkpoint %s instead",
                POINTER, named or "?", problem, fallback[0])
            return fallback[0]
        self.logger.warning("%s names %s, which %s, and no complete checkpoint is in %s",
                            POINTER, named or "?", problem, self.save_dir)
        return ""


# ------------------------------------------------------------------------------------------------
# RNG states
# ------------------------------------------------------------------------------------------------
def capture_rng_state() -> Dict[str, Any]:
    """RNG states of this process, as tensors / ints / tuples (loadable with weights_only)."""
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"name": np_state[0], "keys": torch.from_numpy(np_state[1].astype(np.int64)),
                  "pos": int(np_state[2]), "has_gauss": int(np_state[3]),
                  "cached_gaussian": float(np_state[4])},
        "python": random.getstate(),
        "cuda": None,
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def restore_rng_state(state: Dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    npst = state["numpy"]
    np.random.set_state((npst["name"], npst["keys"].numpy().astype(np.uint32), npst["pos"],
                         npst["has_gauss"], npst["cached_gaussian"]))
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


class isolated_rng:
    """Context manager: whatever the body draws from the global RNGs is undone afterwards, so
    that e.g. a periodic evaluation does not shift the training run's random stream."""

    def __enter__(self):
        self._state = capture_rng_state()
        return self

    def __exit__(self, *exc):
        restore_rng_state(self._state)
        return False


# ------------------------------------------------------------------------------------------------
# Finite-weights guard
# ------------------------------------------------------------------------------------------------
def non_finite_entries(module: torch.nn.Module, limit: int = 8) -> List[str]:
    """Names of parameters / floating buffers holding NaN or inf (at most ``limit``)."""
    module = getattr(module, "module", module)
    bad = []
    for name, tensor in list(module.named_parameters()) + list(module.named_buffers()):
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            bad.append(name)
            if len(bad) >= limit:
                break
    return bad


class CheckpointHook(HookBase):
    """Saves ``model_<iter>.pth`` every ``period`` iterations and ``model_final.pth`` after the
    last one, like detectron2's PeriodicCheckpointer, but

    * registered in every process: before saving, all processes check their weights are finite
      and (with several processes) gather their RNG states for the main process to store;
    * never after a failed step: a step that raised (NaN loss) does not reach ``after_step``,
      and nothing is saved in ``after_train``.
    """

    def __init__(self, checkpointer: DetectionCheckpointer, period: int, file_prefix="model"):
        self.checkpointer = checkpointer
        self.period = int(period)
        self.file_prefix = file_prefix

    def due(self, iteration: int):
        periodic = self.period > 0 and (iteration + 1) % self.period == 0
        final = iteration >= self.trainer.max_iter - 1
        return periodic, final

    def after_step(self):
        iteration = int(self.trainer.iter)
        periodic, final = self.due(iteration)
        if not (periodic or final):
            return
        self.trainer.prepare_checkpoint()
        if periodic:
            self.checkpointer.save(f"{self.file_prefix}_{iteration:07d}", iteration=iteration)
        if final:
            self.checkpointer.save(f"{self.file_prefix}_final", iteration=iteration)


def gather_rng_states() -> Optional[List[Dict[str, Any]]]:
    """Every process's RNG state, indexed by rank (collective with several processes)."""
    mine = capture_rng_state()
    if comm.get_world_size() == 1:
        return [mine]
    return comm.all_gather(mine)
