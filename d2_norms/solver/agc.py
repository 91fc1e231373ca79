"""Adaptive Gradient Clipping (AGC; Brock, De, Smith & Simonyan 2021, "High-Performance
Large-Scale Image Recognition Without Normalization", sec. 4.1).

Unit-wise: for row i of a parameter W (its output unit) with gradient G,

    G_i <- G_i * lambda * max(||W_i||, eps) / ||G_i||   if ||G_i|| > lambda * max(||W_i||, eps)

with Frobenius norms over every dimension but the unit dimension, eps = 1e-3. The unit dimension
is 0 (conv/linear weights are (out, in, ...)), except for transposed convolutions, whose weights
are (in, out, ...): there it is 1, so that a "row" is an output unit everywhere, as in the paper
and its reference code (HWIO layout, norms over all axes but the last). A vector or scalar
parameter (bias, gain, learned eps) is one unit: its norm is that of the whole tensor, as in the
reference code's ``unitwise_norm`` (``len(jnp.squeeze(x).shape) <= 1``: scalars and vectors, the
norm over all of it). As there, "vector" means at most one dimension larger than 1, so the
Scaled WS gain, stored ``(out, 1, 1, 1)`` to broadcast over the weight (a ``(out,)`` vector in
the reference code), is one unit too; timm's ``adaptive_clip_grad`` (``ndim <= 1``) agrees on
1-D tensors and clips a ``(out, 1, 1, 1)`` gain per channel. (Before issue 23 d2_norms clipped
vectors and gains element by element.)

The final classifier/regressor layers are not clipped (paper sec. 4.1: "we do not clip the final
linear layer"). In a detector these are the layers that map features to predictions:
``_prediction_layers`` lists them by detectron2 module class and attribute (box / RetinaNet
classifier and regressor, RPN objectness and deltas, mask / keypoint / sem-seg predictor); their
small initial weights (std 0.01 / 0.001) would make lambda * ||W_i|| a near-freeze. A module opts
out with ``d2n_agc_exclude = True`` (all its parameters) or lists parameter names in
``d2n_agc_exclude_params``.

The NF blocks' SkipInit scalars are listed there too: they start at exactly 0, where the eps
floor caps their update at lr * lambda * 1e-3 per step, so with detection learning rates
(~0.02, 50-100x below NFNet's) the residual branches would stay switched off for thousands of
iterations; the NF paper, where the scalars come from, trains them unclipped.

Selected by ``SOLVER.CLIP_GRADIENTS.ENABLED: True``, ``CLIP_TYPE: "agc"``, ``CLIP_VALUE: lambda``
(``d2_norms.solver.build_optimizer``). Clipping happens in ``optimizer.step()``, as detectron2's
own clipping: under DDP the gradients are then already all-reduced (averaged), under AMP
``GradScaler.step`` has unscaled them before calling ``step()``.
"""
from typing import Dict, Iterable, List, Optional, Set, Type

import torch
from torch import nn

AGC_EPS = 1e-3
CLIP_TYPE = "agc"


def _prediction_layers():
    """detectron2 module class -> attributes holding its final prediction layers."""
    from detectron2.modeling.meta_arch.retinanet import RetinaNetHead
    from detectron2.modeling.proposal_generator.rpn import StandardRPNHead
    from detectron2.modeling.roi_heads.fast_rcnn import FastRCNNOutputLayers
    from detectron2.modeling.roi_heads.keypoint_head import KRCNNConvDeconvUpsampleHead
    from detectron2.modeling.roi_heads.mask_head import MaskRCNNConvUpsampleHead

    layers = {
        FastRCNNOutputLayers: ("cls_score", "bbox_pred"),
        RetinaNetHead: ("cls_score", "bbox_pred"),
        StandardRPNHead: ("objectness_logits", "anchor_deltas"),
        MaskRCNNConvUpsampleHead: ("predictor",),
        KRCNNConvDeconvUpsampleHead: ("score_lowres",),
    }
    try:
        from detectron2.modeling.meta_arch.semantic_seg import SemSegFPNHead

        layers[SemSegFPNHead] = ("predictor",)
    except ImportError:  # pragma: no cover - present in v0.6 and main
        pass
    return layers


def agc_excluded_parameter_names(model: nn.Module) -> List[str]:
    """Qualified names of the parameters AGC leaves alone: those of the final prediction
    layers (see module docstring) and of modules flagged ``d2n_agc_exclude = True``."""
    table = _prediction_layers()
    excluded_modules: Dict[str, nn.Module] = {}
    direct: Set[str] = set()
    for name, module in model.named_modules():
        prefix = f"{name}." if name else ""
        if getattr(module, "d2n_agc_exclude", False):
            excluded_modules[name] = module
        for pname in getattr(module, "d2n_agc_exclude_params", ()):
            if isinstance(getattr(module, pname, None), nn.Parameter):
                direct.add(prefix + pname)
        for cls, attrs in table.items():
            if isinstance(module, cls):
                for attr in attrs:
                    sub = getattr(module, attr, None)
                    if isinstance(sub, nn.Module):
                        excluded_modules[prefix + attr] = sub
    names: Set[str] = set(direct)
    for mname, module in excluded_modules.items():
        for pname, _ in module.named_parameters():
            names.add(f"{mname}.{pname}" if mname else pname)
    return sorted(names)


def unit_dims(model: nn.Module) -> Dict[str, int]:
    """Parameter name -> its unit (output) dimension where it is not 0: the weights of
    transposed convolutions, laid out (in, out, ...)."""
    out = {}
    for name, module in model.named_modules():
        if isinstance(module, nn.modules.conv._ConvTransposeNd) and module.weight.dim() > 1:
            out[f"{name}.weight" if name else "weight"] = 1
    return out


def unitwise_norm(x: torch.Tensor, unit_dim: int = 0) -> torch.Tensor:
    """L2 norm of each unit (row along ``unit_dim``), broadcastable to ``x``; for vectors and
    scalars (at most one dimension larger than 1, e.g. a ``(C,)`` bias or a ``(C, 1, 1, 1)``
    gain) the norm of the whole tensor (one unit), a 0-d tensor."""
    if sum(size > 1 for size in x.shape) <= 1:
        return torch.linalg.vector_norm(x, ord=2)
    dims = tuple(d for d in range(x.dim()) if d != unit_dim)
    return torch.linalg.vector_norm(x, ord=2, dim=dims, keepdim=True)


@torch.no_grad()
def adaptive_clip_grad_(parameter: torch.Tensor, clipping: float, *, unit_dim: int = 0,
                        eps: float = AGC_EPS) -> None:
    """Clip ``parameter.grad`` in place, unit-wise (see module docstring)."""
    grad = parameter.grad
    if grad is None:
        return
    if grad.is_sparse:
        raise TypeError("AGC does not support sparse gradients")
    # Norms in float32 at least: under AMP a half-precision weight's norm could overflow.
    dtype = torch.promote_types(parameter.dtype, torch.float32)
    w_norm = unitwise_norm(parameter.detach().to(dtype), unit_dim).clamp_(min=eps)
    g_norm = unitwise_norm(grad.detach().to(dtype), unit_dim)
    max_norm = w_norm * clipping
    # g_norm > max_norm > 0 wherever the scale is used, so the division is safe there.
    scale = torch.where(g_norm > max_norm, max_norm / g_norm.clamp(min=1e-30),
                        torch.ones_like(g_norm))
    grad.mul_(scale.to(grad.dtype))


def check_clip_value(clipping) -> float:
    value = float(clipping)
    if not value > 0:
        raise ValueError(f"SOLVER.CLIP_GRADIENTS.CLIP_VALUE must be > 0 for CLIP_TYPE 'agc' (it is "
                         f"AGC's lambda; the NFNet paper uses 0.01 at batch 4096 and larger "
                         f"values at smaller batches), got {clipping!r}")
    return value


def clip_param_groups_(param_groups, clipping: float) -> None:
    """AGC on every parameter of every group whose ``"agc"`` entry is not False (unit dimension
    from ``"agc_unit_dim"``, default 0): what an AGC optimizer's ``step()`` does first."""
    for group in param_groups:
        if group.get("agc", True) is False:
            continue
        unit_dim = group.get("agc_unit_dim", 0)
        for p in group["params"]:
            adaptive_clip_grad_(p, clipping, unit_dim=unit_dim)


def with_adaptive_gradient_clipping(optimizer_cls: Type[torch.optim.Optimizer],
                                    clipping: float) -> Type[torch.optim.Optimizer]:
    """A subclass of ``optimizer_cls`` whose ``step()`` first applies AGC with lambda
    ``clipping`` to every parameter of every group whose ``"agc"`` entry is not False (the unit
    dimension of a group comes from its ``"agc_unit_dim"``, default 0). Param groups from
    :func:`agc_param_group_options` mark the excluded layers; usable from LazyConfigs too."""
    clipping = check_clip_value(clipping)

    def step(self, closure=None):
        clip_param_groups_(self.param_groups, clipping)
        return super(cls, self).step(closure)

    cls = type(optimizer_cls.__name__ + "WithAGC", (optimizer_cls,),
               {"step": step, "agc_clipping": clipping})
    return cls


class SGDWithAGC(torch.optim.SGD):
    """``torch.optim.SGD`` whose ``step()`` first applies AGC with lambda ``clipping`` (as
    :func:`with_adaptive_gradient_clipping`), as a named class with the clipping as an argument:
    a LazyConfig's optimizer node carries the NF recipe's clipping itself, so every trainer that
    instantiates the node (detectron2's ``tools/lazyconfig_train_net.py`` included) clips::

        optimizer = L(SGDWithAGC)(
            params=L(d2_norms_optimizer_params)(weight_decay_norm=0.0, agc=True),
            lr=0.02, momentum=0.9, weight_decay=1e-4, clipping=0.01)

    ``agc=True`` marks the prediction layers (and SkipInit scalars) that AGC leaves alone; groups
    without those marks are all clipped. ``clipping=None`` is plain SGD (a recipe LazyConfig's
    one optimizer node serves every normalizer: ``clipping="${d2n_recipe:agc_clipping}"`` is
    the NF recipe's lambda for NF and None otherwise)."""

    def __init__(self, params, lr=1e-3, *, clipping: Optional[float], **kwargs):
        self.agc_clipping = None if clipping is None else check_clip_value(clipping)
        super().__init__(params, lr=lr, **kwargs)

    def step(self, closure=None):
        if self.agc_clipping is not None:
            clip_param_groups_(self.param_groups, self.agc_clipping)
        return super().step(closure)


def agc_param_group_options(model: nn.Module) -> Dict[str, Dict]:
    """Parameter name -> extra param-group entries for AGC ({"agc": False} for excluded layers,
    {"agc_unit_dim": 1} for transposed-conv weights); names not listed need nothing."""
    options: Dict[str, Dict] = {n: {"agc_unit_dim": d} for n, d in unit_dims(model).items()}
    for name in agc_excluded_parameter_names(model):
        options.setdefault(name, {})["agc"] = False
    return options


def agc_param_groups(model: nn.Module, groups: Optional[Iterable[Dict]] = None) -> List[Dict]:
    """For LazyConfigs: one group per parameter (or the given per-parameter ``groups``, each with
    a ``"name"``) with the AGC entries of :func:`agc_param_group_options` added."""
    options = agc_param_group_options(model)
    if groups is None:
        groups = [{"params": [p], "name": n} for n, p in model.named_parameters()
                  if p.requires_grad]
    out = []
    for g in groups:
        g = dict(g)
        g.update(options.get(g.get("name"), {}))
        out.append(g)
    return out
