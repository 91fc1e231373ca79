#!/usr/bin/env python
"""Train or evaluate a detectron2 model with d2_norms' normalizers, backbones and datasets.

    python tools/train_net.py --config-file configs/... [--num-gpus N] [--resume] [KEY VALUE ...]
    python tools/train_net.py --config-file configs/... --eval-only MODEL.WEIGHTS model.pth

With CUDA each process drives one GPU (NCCL); without, processes run on CPU joined by gloo.
"""
import d2_norms  # noqa: F401  (shims + registrations before detectron2 builds anything)
from d2_norms.engine.defaults import run_cli

if __name__ == "__main__":
    run_cli()
