"""What ``tools/train_net.py`` runs: config set-up, training, evaluation-only, results files."""
import argparse
import logging
import os

import torch
from detectron2.config import get_cfg
from detectron2.engine import default_argument_parser, default_setup
from detectron2.utils import comm

from d2_norms.config import add_d2_norms_config

logger = logging.getLogger("d2_norms")


def argument_parser(epilog=None) -> argparse.ArgumentParser:
    """detectron2's CLI (--config-file, --num-gpus, --num-machines, --machine-rank, --dist-url,
    --resume, --eval-only, opts); ``--num-gpus`` means processes on CPU."""
    parser = default_argument_parser(epilog)
    for action in parser._actions:
        if action.dest == "num_gpus":
            action.help = ("number of processes per machine: one per GPU with CUDA (NCCL), "
                           "CPU processes joined with gloo otherwise")
    return parser


def resolve_device(cfg) -> None:
    """MODEL.DEVICE 'cuda' on a machine without CUDA falls back to 'cpu' (logged)."""
    if str(cfg.MODEL.DEVICE).startswith("cuda") and not torch.cuda.is_available():
        logger.warning("MODEL.DEVICE=%s but CUDA is not available: using cpu", cfg.MODEL.DEVICE)
        cfg.MODEL.DEVICE = "cpu"


def setup_cfg(args, *, log: bool = True):
    """Build the frozen config from ``--config-file`` and ``opts``; run detectron2's
    default_setup (logger, config.yaml in OUTPUT_DIR, seeds) when ``log``."""
    cfg = get_cfg()
    add_d2_norms_config(cfg)
    if args.config_file:
        cfg.merge_from_file(args.config_file)
    cfg.merge_from_list(args.opts)
    resolve_device(cfg)
    cfg.freeze()
    if log:
        default_setup(cfg, args)
    return cfg


def main(args):
    """Entry point run in every process by ``launch``."""
    from d2_norms.engine.trainer import Trainer
    from d2_norms.evaluation import save_results, write_run_status
    from detectron2.checkpoint import DetectionCheckpointer

    cfg = setup_cfg(args)
    if args.eval_only:
        model = Trainer.build_model(cfg)
        DetectionCheckpointer(model, save_dir=cfg.OUTPUT_DIR).resume_or_load(
            cfg.MODEL.WEIGHTS, resume=args.resume)
        results = Trainer.test(cfg, model)
        if comm.is_main_process():
            save_results(cfg.OUTPUT_DIR, results, cfg, iteration=None,
                         dataset_name=",".join(cfg.DATASETS.TEST))
        return results

    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=args.resume)
    if comm.is_main_process():
        write_run_status(cfg.OUTPUT_DIR, "running", start_iter=trainer.start_iter,
                         max_iter=trainer.max_iter)
    try:
        results = trainer.train()
    except BaseException as e:
        if comm.is_main_process():
            write_run_status(cfg.OUTPUT_DIR, "failed", iteration=trainer.iter,
                             error=f"{type(e).__name__}: {e}")
        raise
    if comm.is_main_process():
        if results:
            save_results(cfg.OUTPUT_DIR, results, cfg, iteration=trainer.max_iter,
                         dataset_name=",".join(cfg.DATASETS.TEST))
        write_run_status(cfg.OUTPUT_DIR, "finished", iteration=trainer.max_iter)
    return results


def run_cli(argv=None):
    from d2_norms.engine.launch import launch

    args = argument_parser().parse_args(argv)
    print("Command Line Args:", args)
    launch(main, args.num_gpus, num_machines=args.num_machines, machine_rank=args.machine_rank,
           dist_url=args.dist_url, args=(args,))
