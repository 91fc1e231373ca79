from .agc import (
    SGDWithAGC,
    adaptive_clip_grad_,
    agc_excluded_parameter_names,
    agc_param_groups,
    unitwise_norm,
    with_adaptive_gradient_clipping,
)
from .lr_schedule import CosineRampParamScheduler, build_lr_scheduler
from .optimizer import (
    build_optimizer,
    d2_norms_optimizer_params,
    decayed_normalizer_parameters,
    get_optimizer_param_groups,
    is_normalizer_module,
    normalizer_parameter_names,
    warn_decayed_normalizer_parameters,
)

__all__ = ["SGDWithAGC", "adaptive_clip_grad_", "agc_excluded_parameter_names", "agc_param_groups",
           "unitwise_norm", "with_adaptive_gradient_clipping", "CosineRampParamScheduler", "build_lr_scheduler", "build_optimizer", "d2_norms_optimizer_params",
           "get_optimizer_param_groups", "is_normalizer_module", "normalizer_parameter_names",
           "decayed_normalizer_parameters", "warn_decayed_normalizer_parameters"]
