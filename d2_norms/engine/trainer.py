"""The d2_norms trainer: detectron2's DefaultTrainer made device-agnostic (CPU/gloo or CUDA/NCCL)
and aware of d2_norms' evaluator, run status and results files."""
import logging
import weakref

import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.engine import AMPTrainer, DefaultTrainer, SimpleTrainer, TrainerBase
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger
from torch.nn.parallel import DistributedDataParallel

logger = logging.getLogger("d2_norms.trainer")


def create_ddp_model(model: torch.nn.Module, **kwargs) -> torch.nn.Module:
    """DDP wrapper for >1 process: ``device_ids`` only for a CUDA model (gloo/CPU takes None)."""
    if comm.get_world_size() == 1:
        return model
    device = next(model.parameters()).device
    kwargs.setdefault("device_ids", [device.index if device.index is not None
                                     else comm.get_local_rank()] if device.type == "cuda" else None)
    return DistributedDataParallel(model, **kwargs)


class Trainer(DefaultTrainer):
    """DefaultTrainer with:

    - DDP on CPU (gloo) as well as CUDA; AMP only where it exists (CUDA), with a warning otherwise;
    - SGD without weight decay on every normalizer parameter (d2_norms' layers included) and
      a cosine warm-up option (``d2_norms.solver``);
    - COCO evaluation through ``d2_norms.evaluation`` (pycocotools / faster-coco-eval, never the
      compiled fast eval that pure-Python detectron2 lacks);
    - ``train()`` returning the final evaluation results.
    """

    def __init__(self, cfg):  # noqa: D401 -- same construction order as DefaultTrainer
        TrainerBase.__init__(self)
        if not logging.getLogger("detectron2").isEnabledFor(logging.INFO):
            setup_logger()
        cfg = self.auto_scale_workers(cfg, comm.get_world_size())

        model = self.build_model(cfg)
        optimizer = self.build_optimizer(cfg, model)
        data_loader = self.build_train_loader(cfg)
        model = create_ddp_model(model, broadcast_buffers=False)

        use_amp = cfg.SOLVER.AMP.ENABLED
        if use_amp and not str(cfg.MODEL.DEVICE).startswith("cuda"):
            logger.warning("SOLVER.AMP.ENABLED is ignored on %s: detectron2's AMPTrainer needs "
                           "CUDA. Training in float32.", cfg.MODEL.DEVICE)
            use_amp = False
        self._trainer = (AMPTrainer if use_amp else SimpleTrainer)(model, data_loader, optimizer)

        self.scheduler = self.build_lr_scheduler(cfg, optimizer)
        self.checkpointer = DetectionCheckpointer(model, cfg.OUTPUT_DIR,
                                                  trainer=weakref.proxy(self))
        self.start_iter = 0
        self.max_iter = cfg.SOLVER.MAX_ITER
        self.cfg = cfg
        self.register_hooks(self.build_hooks())

    @classmethod
    def build_train_loader(cls, cfg):
        """detectron2's loader with d2_norms' mapper: a missing/unreadable image is an error that
        names the file (in worker processes too). Datasets are checked first, before workers."""
        from detectron2.data import build_detection_train_loader

        from d2_norms.data import SafeDatasetMapper, check_datasets

        check_datasets(cfg, deep=comm.is_main_process())
        return build_detection_train_loader(cfg, mapper=SafeDatasetMapper(cfg, True))

    @classmethod
    def build_test_loader(cls, cfg, dataset_name):
        from detectron2.data import build_detection_test_loader

        from d2_norms.data import SafeDatasetMapper

        return build_detection_test_loader(cfg, dataset_name, mapper=SafeDatasetMapper(cfg, False))

    @classmethod
    def build_optimizer(cls, cfg, model):
        from d2_norms.solver import build_optimizer

        return build_optimizer(cfg, model)

    @classmethod
    def build_lr_scheduler(cls, cfg, optimizer):
        from d2_norms.solver import build_lr_scheduler

        return build_lr_scheduler(cfg, optimizer)

    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        from d2_norms.evaluation import build_evaluator

        return build_evaluator(cfg, dataset_name, output_folder)

    def train(self):
        super().train()
        if comm.get_world_size() > 1:
            from d2_norms.engine.replicas import check_replicas_identical

            check_replicas_identical(self.model)
        return getattr(self, "_last_eval_results", None)
