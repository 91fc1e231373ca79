"""Learning-rate schedules: detectron2's, plus the cosine warm-up ramp of the FRN paper (sec. 4.1:
"we use a cosine ramp-up schedule as well")."""
import math

import torch
from detectron2.solver import build_lr_scheduler as d2_build_lr_scheduler
from detectron2.solver.lr_scheduler import LRMultiplier
from fvcore.common.param_scheduler import (
    CompositeParamScheduler,
    CosineParamScheduler,
    MultiStepParamScheduler,
    ParamScheduler,
)


class CosineRampParamScheduler(ParamScheduler):
    """Rises from ``start_value`` to ``end_value`` along half a cosine over ``where`` in [0, 1)."""

    def __init__(self, start_value: float, end_value: float):
        self._start = start_value
        self._end = end_value

    def __call__(self, where: float) -> float:
        return self._end + (self._start - self._end) * 0.5 * (1.0 + math.cos(math.pi * where))


def _main_schedule(cfg) -> ParamScheduler:
    name = cfg.SOLVER.LR_SCHEDULER_NAME
    if name == "WarmupCosineLR":
        return CosineParamScheduler(1, 0)
    if name == "WarmupMultiStepLR":
        steps = [s for s in cfg.SOLVER.STEPS if s <= cfg.SOLVER.MAX_ITER]
        return MultiStepParamScheduler(values=[cfg.SOLVER.GAMMA ** k for k in range(len(steps) + 1)],
                                       milestones=steps, num_updates=cfg.SOLVER.MAX_ITER)
    raise ValueError(f"SOLVER.LR_SCHEDULER_NAME={name!r}: expected WarmupMultiStepLR or "
                     "WarmupCosineLR")


def build_lr_scheduler(cfg, optimizer: torch.optim.Optimizer):
    """detectron2's scheduler, with SOLVER.WARMUP_METHOD "cosine" added to "linear"/"constant"."""
    if cfg.SOLVER.WARMUP_METHOD != "cosine":
        return d2_build_lr_scheduler(cfg, optimizer)
    main = _main_schedule(cfg)
    length = min(cfg.SOLVER.WARMUP_ITERS / cfg.SOLVER.MAX_ITER, 1.0)
    ramp = CosineRampParamScheduler(cfg.SOLVER.WARMUP_FACTOR * main(0.0), main(length))
    sched = CompositeParamScheduler([ramp, main], interval_scaling=["rescaled", "fixed"],
                                    lengths=[length, 1 - length])
    return LRMultiplier(optimizer, multiplier=sched, max_iter=cfg.SOLVER.MAX_ITER)
