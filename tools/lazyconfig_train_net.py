#!/usr/bin/env python
"""Train or evaluate a model described by a LazyConfig (configs/lazy/) on d2_norms' engine.

    python tools/lazyconfig_train_net.py --config-file configs/lazy/... [--num-gpus N] [--resume] \
        [key=value ...]      # e.g. recipe.norm=FRN recipe.ims_per_gpu=2 train.max_iter=4 \
                             #      train.output_dir=out train.device=cpu
    python tools/lazyconfig_train_net.py --config-file RUN/config.yaml --eval-only \
        train.init_checkpoint=RUN/model_final.pth

    torchrun --nproc_per_node N tools/lazyconfig_train_net.py --config-file ... [key=value ...]

Every guarantee of tools/train_net.py (same engine): CPU processes joined by gloo without CUDA,
atomic checkpoints and bitwise-identical --resume, a non-finite loss stops training (exit code
1), bad input (unknown key, norm name, dataset, mismatched weights) is reported before anything
is written (exit code 2), results.json / run_status.json, d2_norms' evaluator.
"""
import d2_norms  # noqa: F401  (shims + registrations before detectron2 builds anything)
from d2_norms.lazy.engine import run_cli

if __name__ == "__main__":
    run_cli()
