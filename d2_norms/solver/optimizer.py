"""SGD with no weight decay on normalizer parameters (GN paper sec. 4.2).

Detectron2 applies SOLVER.WEIGHT_DECAY_NORM only to parameters of torch's norm classes;
d2_norms' layers (FRN gamma/beta/tau/learned eps, Scaled WS gains and biases, SkipInit scalars)
would silently get the normal weight decay. Here a parameter is a "normalizer parameter" when
its module is one of torch's / detectron2's normalization layers (``TORCH_NORM_TYPES``; d2_norms'
GroupNorm is torch's), or when the module declares it: ``d2n_is_normalizer = True`` (every
parameter of the module: FRN, TLU) or ``d2n_norm_params`` (a tuple of parameter names: Scaled WS
``gain`` and ``bias``, the NF blocks' ``skip_gain``). The declarations live on the layers; a
third-party layer opts in the same way.

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
try:
    # BN in detectron2's RetinaNet head: one BN per FPN level sharing an affine weight/bias
    # held by the list itself (its BN children have affine=False).
    from detectron2.layers.batch_norm import CycleBatchNormList

    TORCH_NORM_TYPES += (CycleBatchNormList,)
except ImportError:  # detectron2 versions without it
    pass


def is_normalizer_module(module: torch.nn.Module) -> bool:
    """Torch's / detectron2's norm layers, or a module declaring ``d2n_is_normalizer = True``
    (d2_norms' FRN and TLU; how a third-party normalizer opts in)."""
    return (isinstance(module, TORCH_NORM_TYPES)
            or bool(getattr(module, "d2n_is_normalizer", False)))


def normalizer_parameter_names(model: torch.nn.Module) -> List[str]:
    """Qualified names of every normalizer parameter of ``model`` (see module docstring)."""
    names = []
    for module_name, module in model.named_modules():
        listed = set(getattr(module, "d2n_norm_params", ()))
        whole = is_normalizer_module(module)
        for param_name, _ in module.named_parameters(recurse=False):
            if whole or param_name in listed:
                names.append(f"{module_name}.{param_name}" if module_name else param_name)
    return names


def d2_norms_optimizer_params(model: torch.nn.Module, base_lr=None, weight_decay=None,
                              weight_decay_norm=None, bias_lr_factor: float = 1.0,
                              weight_decay_bias=None, overrides=None,
                              agc: bool = False) -> List[Dict]:
    """d2_norms' replacement for detectron2's ``get_default_optimizer_params`` (same arguments;
    usable from a LazyConfig as ``L(d2_norms_optimizer_params)(model=None, ...)``, the model
    filled in by the trainer): one group per parameter, named (``"name"``).

    ``weight_decay_norm`` applies to every normalizer parameter (:func:`normalizer_parameter_names`:
    d2_norms' FRN/TLU, GN/WS, Scaled WS gains and biases, SkipInit, and torch's norms), where
    detectron2's function knows torch's norm classes only. Other biases get ``bias_lr_factor``
    and ``weight_decay_bias`` (None: ``weight_decay``). A normalizer bias is a normalizer
    parameter first (no bias lr factor). ``overrides``: {parameter leaf name: {hyper-parameter:
    value}}, applied last, as detectron2's. ``None`` values leave the optimizer's default.
    ``agc``: add the AGC entries (:func:`d2_norms.solver.agc.agc_param_group_options`: prediction
    layers unclipped, transposed-conv unit dimension) for ``SGDWithAGC``."""
    if base_lr is None and bias_lr_factor != 1.0:
        raise ValueError("bias_lr_factor requires base_lr")
    norm_names = set(normalizer_parameter_names(model))
    groups, seen = [], set()
    for name, param in model.named_parameters():
        if not param.requires_grad or id(param) in seen:
            continue
        seen.add(id(param))
        lr, decay = base_lr, weight_decay
        if name in norm_names:
            if weight_decay_norm is not None:
                decay = weight_decay_norm
        elif name.endswith(".bias") or name == "bias":
            if base_lr is not None:
                lr = base_lr * bias_lr_factor
            # detectron2: WEIGHT_DECAY_BIAS None means "same as WEIGHT_DECAY"
            if weight_decay_bias is not None:
                decay = weight_decay_bias
        group = {"params": [param], "name": name}
        if lr is not None:
            group["lr"] = lr
        if decay is not None:
            group["weight_decay"] = decay
        group.update((overrides or {}).get(name.rpartition(".")[2], {}))
        groups.append(group)
    if agc:  # (the argument shadows the module here)
        options = _agc_options(model)
        for group in groups:
            group.update(options.get(group["name"], {}))
    return groups


def _agc_options(model):
    from .agc import agc_param_group_options

    return agc_param_group_options(model)


def decayed_normalizer_parameters(model: torch.nn.Module,
                                  optimizer: torch.optim.Optimizer) -> List[str]:
    """Names of the normalizer parameters (:func:`normalizer_parameter_names`) that
    ``optimizer`` applies weight decay to (e.g. built with detectron2's
    ``get_default_optimizer_params``, which knows torch's norm classes only: FRN gamma/beta/tau,
    TLU tau, Scaled WS gains/biases and SkipInit scalars would be decayed)."""
    names = {id(p): n for n, p in model.named_parameters()}
    norm = set(normalizer_parameter_names(model))
    decayed = []
    for group in optimizer.param_groups:
        if float(group.get("weight_decay", 0.0) or 0.0) == 0.0:
            continue
        decayed += [names[id(p)] for p in group["params"] if names.get(id(p)) in norm]
    return decayed


NORM_DECAY_FIX = (
    "the papers train them without weight decay (GN sec. 4.2; NF App. B.1). In a LazyConfig use "
    "d2_norms' parameter groups: optimizer.params = L(d2_norms_optimizer_params)("
    "weight_decay_norm=0.0) (from d2_norms.lazy import d2_norms_optimizer_params); in yacs set "
    "SOLVER.WEIGHT_DECAY_NORM: 0.0")


def warn_decayed_normalizer_parameters(model, optimizer, logger) -> List[str]:
    """Log a warning naming how many normalizer parameters get weight decay, and the fix."""
    decayed = decayed_normalizer_parameters(model, optimizer)
    if decayed:
        shown = ", ".join(decayed[:4]) + (", ..." if len(decayed) > 4 else "")
        logger.warning("%d normalizer parameters get weight decay from this optimizer (%s): %s",
                       len(decayed), shown, NORM_DECAY_FIX)
    return decayed


def get_optimizer_param_groups(cfg, model: torch.nn.Module) -> List[Dict]:
    """One group per parameter with its lr and weight decay: WEIGHT_DECAY_NORM for normalizer
    parameters, WEIGHT_DECAY_BIAS / BIAS_LR_FACTOR for other biases, WEIGHT_DECAY otherwise."""
    solver = cfg.SOLVER
    return d2_norms_optimizer_params(
        model, base_lr=solver.BASE_LR, weight_decay=solver.WEIGHT_DECAY,
        weight_decay_norm=solver.WEIGHT_DECAY_NORM, bias_lr_factor=solver.BIAS_LR_FACTOR,
        weight_decay_bias=solver.WEIGHT_DECAY_BIAS)


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
