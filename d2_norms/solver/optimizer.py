"""SGD with no weight decay on normalizer parameters (GN paper sec. 4.2).

Detectron2 v0.6 applies SOLVER.WEIGHT_DECAY_NORM only to parameters of its own norm classes;
d2_norms' layers (FRN gamma/beta/tau/learned eps, GN/WS variants, Scaled WS gains, SkipInit
scalars) would silently get the normal weight decay. Here a parameter is a "normalizer parameter"
when its module is a normalization layer (torch's, detectron2's, d2_norms' FRN/TLU/affine, or
any module with ``d2n_is_normalizer = True``), or when its module lists it in ``d2n_norm_params``
(a tuple of parameter names; Scaled WS gains and biases and NF SkipInit scalars are listed here).

NF paper App. B.1: the affine gain and bias of every Scaled WS conv are normalizer parameters
("we do not weight decay or otherwise regularize these weights"), so a Scaled WS conv's bias gets
WEIGHT_DECAY_NORM (and the base lr), not the ordinary bias treatment.

``SOLVER.CLIP_GRADIENTS.CLIP_TYPE: "agc"`` selects Adaptive Gradient Clipping
(:mod:`d2_norms.solver.agc`); the other clip types are detectron2's.
"""
from typing import Dict, List

import torch
from detectron2.layers import FrozenBatchNorm2d, NaiveSyncBatchNorm
from detectron2.solver.build import maybe_add_gradient_clipping

from . import agc

TORCH_NORM_TYPES = (
    torch.nn.modules.batchnorm._BatchNorm,
    torch.nn.GroupNorm,
    torch.nn.LayerNorm,
    torch.nn.LocalResponseNorm,
    torch.nn.modules.instancenorm._InstanceNorm,
    FrozenBatchNorm2d,
    NaiveSyncBatchNorm,
)


def _d2_norms_norm_types():
    from d2_norms.layers import TLU, ChannelAffine, FilterResponseNorm2d

    return (FilterResponseNorm2d, TLU, ChannelAffine)


def _listed_norm_params(module: torch.nn.Module):
    """Normalizer parameters of modules that also hold ordinary weights."""
    from d2_norms.layers import ScaledStdConv2d
    from d2_norms.modeling.nf_resnet import _NFBlockBase

    listed = set(getattr(module, "d2n_norm_params", ()))
    if isinstance(module, ScaledStdConv2d):
        listed.add("gain")  # NF eq. 3 affine gain
        listed.add("bias")  # NF App. B.1: the affine bias is not weight-decayed either
    if isinstance(module, _NFBlockBase):
        listed.add("skip_gain")  # SkipInit scalar
    return listed


def is_normalizer_module(module: torch.nn.Module) -> bool:
    """Torch's / detectron2's / d2_norms' norm layers, or a module flagged
    ``d2n_is_normalizer = True`` (how a third-party normalizer opts in)."""
    return (isinstance(module, TORCH_NORM_TYPES + _d2_norms_norm_types())
            or bool(getattr(module, "d2n_is_normalizer", False)))


def normalizer_parameter_names(model: torch.nn.Module) -> List[str]:
    """Qualified names of every normalizer parameter of ``model`` (see module docstring)."""
    names = []
    for module_name, module in model.named_modules():
        listed = _listed_norm_params(module)
        whole = is_normalizer_module(module)
        for param_name, _ in module.named_parameters(recurse=False):
            if whole or param_name in listed:
                names.append(f"{module_name}.{param_name}" if module_name else param_name)
    return names


def get_optimizer_param_groups(cfg, model: torch.nn.Module) -> List[Dict]:
    """One group per parameter with its lr and weight decay: WEIGHT_DECAY_NORM for normalizer
    parameters, WEIGHT_DECAY_BIAS / BIAS_LR_FACTOR for other biases, WEIGHT_DECAY otherwise."""
    solver = cfg.SOLVER
    norm_names = set(normalizer_parameter_names(model))
    groups, seen = [], set()
    for name, param in model.named_parameters():
        if not param.requires_grad or id(param) in seen:
            continue
        seen.add(id(param))
        lr, decay = solver.BASE_LR, solver.WEIGHT_DECAY
        if name in norm_names:
            decay = solver.WEIGHT_DECAY_NORM
        elif name.endswith(".bias"):
            lr = solver.BASE_LR * solver.BIAS_LR_FACTOR
            # detectron2: WEIGHT_DECAY_BIAS None means "same as WEIGHT_DECAY"
            if solver.WEIGHT_DECAY_BIAS is not None:
                decay = solver.WEIGHT_DECAY_BIAS
        groups.append({"params": [param], "lr": lr, "weight_decay": decay, "name": name})
    return groups


def _uses_agc(cfg) -> bool:
    clip = cfg.SOLVER.CLIP_GRADIENTS
    return bool(clip.ENABLED) and str(clip.CLIP_TYPE).lower() == agc.CLIP_TYPE


def build_optimizer(cfg, model: torch.nn.Module) -> torch.optim.Optimizer:
    """SGD (momentum, nesterov from SOLVER) with the groups above and SOLVER.CLIP_GRADIENTS:
    detectron2's "value" / "norm" clipping, or "agc" (CLIP_VALUE = AGC's lambda; the final
    prediction layers are not clipped, see :mod:`d2_norms.solver.agc`)."""
    groups = get_optimizer_param_groups(cfg, model)
    if _uses_agc(cfg):
        options = agc.agc_param_group_options(model)
        for group in groups:
            group.update(options.get(group["name"], {}))
        sgd = agc.with_adaptive_gradient_clipping(torch.optim.SGD,
                                                  cfg.SOLVER.CLIP_GRADIENTS.CLIP_VALUE)
    else:
        sgd = maybe_add_gradient_clipping(cfg, torch.optim.SGD)
    return sgd(groups, lr=cfg.SOLVER.BASE_LR, momentum=cfg.SOLVER.MOMENTUM,
               nesterov=cfg.SOLVER.NESTEROV)
