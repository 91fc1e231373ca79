"""Training engine: the Trainer, CPU/gloo launch, crash-safe checkpoints, a resumable data
order, and the input checks ``tools/train_net.py`` runs before anything starts.

* :class:`Trainer` - detectron2's DefaultTrainer, device-agnostic, exact resume, non-finite
  loss guard (``trainer``);
* :func:`launch` - NCCL on CUDA, gloo on CPU (``launch``);
* :class:`AtomicCheckpointer`, :class:`CheckpointHook` - atomic files and pointer, RNG states
  (``checkpoint``);
* :func:`build_resumable_train_loader` - sample order and augmentations as functions of
  (seed, stream position) (``train_loader``);
* ``preflight`` / ``errors`` - bad input reported before workers start, nothing overwritten.
"""
from .checkpoint import AtomicCheckpointer, CheckpointHook
from .train_loader import build_resumable_train_loader
from .errors import (BatchSizeError, ConfigFileError, ConfigKeyError, NonFiniteLossError,
                     NonFiniteWeightsError, WeightsMismatchError)
from .launch import launch
from .trainer import Trainer, create_ddp_model

__all__ = ["launch", "Trainer", "create_ddp_model", "AtomicCheckpointer", "CheckpointHook",
           "build_resumable_train_loader", "BatchSizeError", "ConfigFileError", "ConfigKeyError",
           "NonFiniteLossError", "NonFiniteWeightsError", "WeightsMismatchError"]
