from .lr_schedule import CosineRampParamScheduler, build_lr_scheduler
from .optimizer import (
    build_optimizer,
    get_optimizer_param_groups,
    is_normalizer_module,
    normalizer_parameter_names,
)

__all__ = ["CosineRampParamScheduler", "build_lr_scheduler", "build_optimizer",
           "get_optimizer_param_groups", "is_normalizer_module", "normalizer_parameter_names"]
