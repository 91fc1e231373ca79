"""The from-scratch recipe inside a detectron2-style LazyConfig, applied by one function.

d2_norms' LazyConfigs (``configs/lazy/``) are shaped like detectron2's ``new_baselines``: a
``model`` graph of d2_norms components, ``dataloader``, ``optimizer``, ``lr_multiplier`` and
``train`` nodes. The values that depend on the normalizer or on the images per GPU are
interpolations ``"${d2n_recipe:KEY}"`` that read the config's ``recipe`` node when they are
used, so an override of ``recipe.norm`` or ``recipe.ims_per_gpu`` on the command line changes
every dependent value, with detectron2's own ``tools/lazyconfig_train_net.py`` as well::

    recipe = dict(detector="retinanet", norm="FRN", ims_per_gpu=2, num_gpus=8)

    tools/lazyconfig_train_net.py --config-file configs/lazy/COCO-scratch/retinanet_R_101_FPN.py \
        recipe.norm=GN recipe.ims_per_gpu=4

:func:`recipe_values` is that one function (it calls the rules of :mod:`d2_norms.recipes`, the
same as the yacs cells); the keys are :data:`RECIPE_VALUE_KEYS`. Editing a node directly
(``model.backbone.norm=GN``) replaces its interpolation: per-part settings still override.

``recipe`` fields: ``detector`` ("retinanet" / "mask_rcnn"), ``norm`` (a recipe normalizer of
:data:`d2_norms.recipes.NORMALIZERS`, or any registered name: then every part gets it, as
:func:`d2_norms.lazy.components.d2_norms_model`), ``ims_per_gpu``, ``num_gpus`` (the papers' 8;
total batch = ims_per_gpu x num_gpus; d2_norms' trainer sets it to the process count, keeping
the images per GPU, as the yacs cells' auto-scaling), ``frn_base_lr`` (RetinaNet), ``length``
("3x" / "9x", Mask R-CNN), ``parts`` ({part: norm}: :data:`~d2_norms.lazy.components.PART_KEYS`).

The resolver ``d2n_recipe`` is registered with OmegaConf when this module is imported (the
configs import it); it adds a name and changes nothing else.
"""
import difflib
from typing import Any, Dict, Mapping

__all__ = ["UNIT_VARIANCE_BGR_STD", "RECIPE_FIELDS", "RECIPE_VALUE_KEYS", "RESOLVER", "recipe_values",
           "recipe_lr_multiplier", "check_recipe_node", "register_resolver"]

RESOLVER = "d2n_recipe"
#: the from-scratch input std (ImageNet's, BGR 0-255): unit-variance inputs, as every cell
UNIT_VARIANCE_BGR_STD = [57.375, 57.120, 58.395]
RECIPE_FIELDS = ("detector", "norm", "ims_per_gpu", "num_gpus", "frn_base_lr", "length", "parts")
#: what ``${d2n_recipe:KEY}`` can name
RECIPE_VALUE_KEYS = (
    "backbone_norm", "fpn_norm", "head_norm", "head_norm_per_level", "rpn_norm",
    "box_head_norm", "mask_head_norm",
    "total_batch", "lr", "momentum", "weight_decay", "agc_clipping",
    "max_iter", "steps", "warmup_iters", "warmup_method", "lr_scheduler_name",
    "checkpoint_period", "eval_period", "precise_bn")
_PART_VALUES = {"backbone": "backbone_norm", "fpn": "fpn_norm", "head": "head_norm",
                "rpn": "rpn_norm", "box_head": "box_head_norm", "mask_head": "mask_head_norm"}


def _plain(node) -> Any:
    try:
        from omegaconf import DictConfig, ListConfig, OmegaConf
    except ImportError:  # pragma: no cover
        return node
    if isinstance(node, (DictConfig, ListConfig)):
        return OmegaConf.to_container(node, resolve=True)
    return node


def check_recipe_node(recipe: Mapping) -> Dict[str, Any]:
    """The ``recipe`` node with defaults filled; every bad field in one LazyConfigError."""
    from d2_norms import recipes
    from d2_norms.engine.errors import LazyConfigError

    recipe = dict(_plain(recipe) or {})
    problems = []
    unknown = [k for k in recipe if k not in RECIPE_FIELDS]
    for key in unknown:
        close = difflib.get_close_matches(key, RECIPE_FIELDS, n=1)
        problems.append(f"recipe.{key} is not a recipe field"
                        + (f" (did you mean recipe.{close[0]}?)" if close else "")
                        + f"; the fields are {', '.join(RECIPE_FIELDS)}")
    detector = recipe.get("detector")
    if detector not in recipes.DETECTORS:
        problems.append(f"recipe.detector={detector!r}: choose one of "
                        f"{', '.join(recipes.DETECTORS)}")
    for key, default in (("ims_per_gpu", None), ("num_gpus", recipes.REFERENCE_WORLD_SIZE)):
        value = recipe.get(key, default)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            problems.append(f"recipe.{key}={value!r}: a positive integer is needed (e.g. "
                            f"recipe.{key}=2)")
        recipe[key] = value
    recipe.setdefault("frn_base_lr", recipes.FRN_DEFAULT_BASE_LR)
    recipe.setdefault("length", "3x")
    recipe.setdefault("parts", {})
    if detector == "mask_rcnn" and recipe["length"] not in recipes.GN_SCHEDULES:
        problems.append(f"recipe.length={recipe['length']!r}: choose one of "
                        f"{', '.join(sorted(recipes.GN_SCHEDULES))}")
    if not isinstance(recipe["frn_base_lr"], (int, float)) or recipe["frn_base_lr"] <= 0:
        problems.append(f"recipe.frn_base_lr={recipe['frn_base_lr']!r}: a positive number "
                        f"(the paper's sweep: {', '.join(map(str, recipes.FRN_BASE_LRS))})")
    if not isinstance(recipe["parts"], Mapping):
        problems.append(f"recipe.parts={recipe['parts']!r}: a mapping {{part: norm}}")
    elif detector in recipes.DETECTORS:
        from .components import model_parts

        usable = model_parts(detector)
        for part in recipe["parts"]:
            if part not in usable:
                problems.append(f"recipe.parts.{part}: a {detector} model has the parts "
                                f"{', '.join(usable)}")
    if not problems and detector in recipes.DETECTORS:
        try:
            _norm_fields(recipe)
        except LazyConfigError as e:
            problems.append(str(e).replace("d2_norms_model: ", "recipe.norm / recipe.parts: "))
    if problems:
        raise LazyConfigError("the recipe node has problems:\n  - " + "\n  - ".join(problems))
    return recipe


def _norm_fields(recipe: Mapping) -> Dict[str, str]:
    from .components import fields_with_parts

    return fields_with_parts(recipe["detector"], recipe.get("norm"), recipe.get("parts"))


def recipe_values(recipe: Mapping) -> Dict[str, Any]:
    """Every value of :data:`RECIPE_VALUE_KEYS` for one recipe node: the norms of the parts
    (:func:`d2_norms.recipes.normalizer_fields`, ``recipe.parts`` replacing single parts), the
    schedule at total batch ims_per_gpu x num_gpus (:func:`d2_norms.recipes.schedule_for`) and
    the per-normalizer extras (per-level head norms, AGC, PreciseBN): what the yacs
    cell of the same normalizer and images per GPU holds."""
    from d2_norms import recipes

    recipe = check_recipe_node(recipe)
    detector, norm = recipe["detector"], recipe["norm"]
    fields = _norm_fields(recipe)
    sched = recipes.schedule_for(detector, recipe["ims_per_gpu"], world_size=recipe["num_gpus"],
                                 frn_base_lr=float(recipe["frn_base_lr"]),
                                 length=recipe["length"])
    whole = recipes.normalizer_fields(detector, norm)
    out = {
        "backbone_norm": fields["MODEL.RESNETS.NORM"],
        "fpn_norm": fields["MODEL.FPN.NORM"],
        "head_norm": fields.get("MODEL.RETINANET.NORM", ""),
        "rpn_norm": fields.get("MODEL.RPN.NORM", ""),
        "box_head_norm": fields.get("MODEL.ROI_BOX_HEAD.NORM", ""),
        "mask_head_norm": fields.get("MODEL.ROI_MASK_HEAD.NORM", ""),
        "total_batch": sched.ims_per_batch,
        "lr": sched.base_lr,
        "momentum": sched.momentum,
        "weight_decay": sched.weight_decay,
        "max_iter": sched.max_iter,
        "steps": list(sched.steps),
        "warmup_iters": sched.warmup_iters,
        "warmup_method": sched.warmup_method,
        "lr_scheduler_name": sched.lr_scheduler_name,
        "checkpoint_period": sched.checkpoint_period,
        "eval_period": sched.eval_period,
        "precise_bn": bool(whole.get("TEST.PRECISE_BN.ENABLED", False)),
    }
    # AGC: the NF recipe's clipping wherever a part uses Scaled WS convs
    from .components import _conv_kind

    uses_scaled_ws = any(_conv_kind(v) == "scaled_ws" for v in fields.values() if v)
    out["agc_clipping"] = recipes.NF_AGC_CLIPPING if uses_scaled_ws else None
    head = out["head_norm"]
    out["head_norm_per_level"] = bool(head) and detector == "retinanet" and bool(
        recipes.normalizer_fields(detector, head)["MODEL.RETINANET.NORM_PER_LEVEL"])
    return out


def _resolve(key: str, *, _root_):
    from d2_norms.engine.errors import LazyConfigError

    if key not in RECIPE_VALUE_KEYS:
        close = difflib.get_close_matches(key, RECIPE_VALUE_KEYS, n=1)
        raise LazyConfigError(f"${{{RESOLVER}:{key}}}: no such recipe value"
                              + (f" (did you mean {close[0]}?)" if close else "")
                              + f"; the values are {', '.join(RECIPE_VALUE_KEYS)}")
    if "recipe" not in _root_:
        raise LazyConfigError(f"${{{RESOLVER}:{key}}} needs a top-level recipe node "
                              "(recipe = dict(detector=..., norm=..., ims_per_gpu=...))")
    return recipe_values(_root_.recipe)[key]


def register_resolver() -> None:
    from omegaconf import OmegaConf

    if not OmegaConf.has_resolver(RESOLVER):
        OmegaConf.register_new_resolver(RESOLVER, _resolve)


def recipe_lr_multiplier(*, lr_scheduler_name: str, max_iter: int, steps=(), warmup_iters: int = 0,
                         warmup_method: str = "linear", warmup_factor: float = 0.001,
                         gamma: float = 0.1):
    """The lr multiplier (an fvcore ParamScheduler for detectron2's ``LRMultiplier``, as a
    LazyConfig's ``lr_multiplier``) that the yacs path builds from the same SOLVER values
    (``d2_norms.solver.build_lr_scheduler``: detectron2's warm-up, or the FRN paper's cosine
    ramp). Built by that function, so the two paths cannot differ."""
    import torch
    from detectron2.config import get_cfg

    from d2_norms.config import add_d2_norms_config
    from d2_norms.solver import build_lr_scheduler

    cfg = add_d2_norms_config(get_cfg())
    s = cfg.SOLVER
    s.LR_SCHEDULER_NAME, s.MAX_ITER = str(lr_scheduler_name), int(max_iter)
    s.STEPS = tuple(int(v) for v in (steps or ()))
    s.WARMUP_ITERS, s.WARMUP_METHOD = int(warmup_iters), str(warmup_method)
    s.WARMUP_FACTOR, s.GAMMA = float(warmup_factor), float(gamma)
    s.BASE_LR = 1.0
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    return build_lr_scheduler(cfg, optimizer)._multiplier


register_resolver()
