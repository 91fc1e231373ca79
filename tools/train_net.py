#!/usr/bin/env python
"""Train or evaluate a detectron2 model with d2_norms' normalizers, backbones and datasets.

    python tools/train_net.py --config-file configs/... [--num-gpus N] [--resume] [KEY VALUE ...]
    python tools/train_net.py --config-file configs/... --eval-only MODEL.WEIGHTS model.pth

    torchrun --nproc_per_node N tools/train_net.py --config-file configs/... [KEY VALUE ...]

With CUDA each process drives one GPU (NCCL); without, processes run on CPU joined by gloo.
Under torchrun (or a scheduler setting RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE,
MASTER_ADDR, MASTER_PORT) each process joins the launcher's group instead of spawning its own.
"""
import d2_norms  # noqa: F401  (shims + registrations before detectron2 builds anything)
from d2_norms.engine.defaults import run_cli

if __name__ == "__main__":
    run_cli()
