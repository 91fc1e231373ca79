"""LazyConfig support: the functions d2_norms' LazyConfigs (``configs/lazy/``) call.

A d2_norms LazyConfig has these top-level nodes (``tools/make_configs.py`` writes them):

- ``recipe``: the cell - ``detector`` ("retinanet" / "mask_rcnn"), ``depth``, ``norm`` (the one
  field that sets the normalizer of backbone, FPN and heads, :data:`d2_norms.recipes.NORMALIZERS`),
  ``ims_per_gpu`` (the one field that sets the images per GPU), ``schedule`` ("recipe": the
  solver comes from ``d2_norms/recipes.py`` at ``ims_per_gpu``, as the yacs twin; "base": the
  base file's solver with ``IMS_PER_BATCH = ims_per_gpu x reference_world_size``),
  ``frn_base_lr``, ``length``, ``reference_world_size``;
- ``train``: detectron2's ``configs/common/train.py`` names (``output_dir``, ``init_checkpoint``,
  ``max_iter``, ``device``, ``seed``, ``eval_period``, ``amp.enabled``, ``checkpointer.period``);
  None means the recipe's / base file's value;
- ``settings = L(recipe_settings)(base=..., recipe="${recipe}", train="${train}",
  overrides={...})``: the engine's settings, a yacs config (any detectron2 / d2_norms key can be
  set under ``overrides``, nested: ``settings.overrides.SOLVER.BASE_LR=0.01``);
- ``model = L(build_model)(cfg="${settings}")``: the model, through the same builders as the yacs
  configs (so a lazy model equals its yacs twin);
- ``optimizer = L(build_optimizer)(cfg="${settings}", model=None)`` (model filled by the
  trainer): SGD with :func:`d2_norms_optimizer_params` groups (no weight decay on any normalizer
  parameter), AGC for the NF cells.

Everything is a registered function or plain data (no lambdas, no closures), so
``LazyConfig.save`` + ``LazyConfig.load`` gives the same config and model.
``d2_norms_optimizer_params`` also replaces detectron2's ``get_default_optimizer_params`` in a
detectron2-style LazyConfig: ``L(torch.optim.SGD)(params=L(d2_norms_optimizer_params)(
weight_decay_norm=0.0), lr=..., momentum=0.9, weight_decay=1e-4)``.
"""
import difflib
from typing import Any, Dict, Mapping, Optional

from d2_norms.solver.optimizer import d2_norms_optimizer_params

__all__ = ["recipe_settings", "build_model", "build_optimizer", "d2_norms_optimizer_params",
           "TRAIN_KEYS", "RECIPE_KEYS"]

#: LazyConfig ``train`` entries (detectron2's names) -> the settings key they set
TRAIN_KEYS = {
    "output_dir": "OUTPUT_DIR",
    "init_checkpoint": "MODEL.WEIGHTS",
    "max_iter": "SOLVER.MAX_ITER",
    "device": "MODEL.DEVICE",
    "seed": "SEED",
    "eval_period": "TEST.EVAL_PERIOD",
    "amp.enabled": "SOLVER.AMP.ENABLED",
    "checkpointer.period": "SOLVER.CHECKPOINT_PERIOD",
}
RECIPE_KEYS = ("detector", "depth", "norm", "ims_per_gpu", "schedule", "frn_base_lr", "length",
               "reference_world_size")
SCHEDULES = ("recipe", "base")


def _plain(node) -> Any:
    """A DictConfig/ListConfig (interpolations resolved) as plain dicts/lists."""
    try:
        from omegaconf import DictConfig, ListConfig, OmegaConf
    except ImportError:  # pragma: no cover - detectron2's LazyConfig needs omegaconf
        return node
    if isinstance(node, (DictConfig, ListConfig)):
        return OmegaConf.to_container(node, resolve=True)
    return node


def _dotted(node: Mapping, prefix: str = ""):
    """(dotted key, value) of every leaf of a nested mapping."""
    for key, value in node.items():
        full = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            yield from _dotted(value, full + ".")
        else:
            yield full, value


def _get(node: Mapping, dotted: str):
    for part in dotted.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return None
        node = node[part]
    return node


def check_recipe(recipe: Mapping) -> None:
    """Bad ``recipe`` values: errors that name the field, what is allowed and close matches."""
    from d2_norms import recipes
    from d2_norms.engine.errors import BatchSizeError, LazyConfigError
    from d2_norms.layers import UnknownNormError

    unknown = [k for k in recipe if k not in RECIPE_KEYS]
    if unknown:
        hints = {k: difflib.get_close_matches(k, RECIPE_KEYS, n=1) for k in unknown}
        raise LazyConfigError(
            "unknown recipe field(s) " + ", ".join(
                f"recipe.{k}" + (f" (did you mean recipe.{hints[k][0]}?)" if hints[k] else "")
                for k in unknown) + f"; the fields are {', '.join(RECIPE_KEYS)}")
    norm = recipe.get("norm")
    if norm not in recipes.NORMALIZERS:
        close = difflib.get_close_matches(str(norm), recipes.NORMALIZERS, n=2, cutoff=0.4)
        lowered = [n for n in recipes.NORMALIZERS if n.lower() == str(norm).lower()]
        raise UnknownNormError(
            f"recipe.norm={norm!r} is not one of the recipe's normalizers "
            f"{', '.join(recipes.NORMALIZERS)}"
            + (f". Did you mean {' or '.join(repr(c) for c in (lowered or close))}?"
               if lowered or close else "")
            + " (recipe.norm sets backbone, FPN and head norms together; another registered "
            "name can be set per part under settings.overrides, e.g. "
            "settings.overrides.MODEL.RESNETS.NORM=FRN_LEPS)")
    detector = recipe.get("detector")
    if detector not in recipes.DETECTORS:
        raise LazyConfigError(f"recipe.detector={detector!r}: choose one of {recipes.DETECTORS}")
    ims = recipe.get("ims_per_gpu")
    if isinstance(ims, bool) or not isinstance(ims, int) or ims < 1:
        raise BatchSizeError(f"recipe.ims_per_gpu={ims!r}: the images per GPU must be a positive "
                             "integer (e.g. recipe.ims_per_gpu=2)")
    schedule = recipe.get("schedule", "recipe")
    if schedule not in SCHEDULES:
        raise LazyConfigError(f"recipe.schedule={schedule!r}: choose one of {SCHEDULES}")


def recipe_fields(recipe: Mapping) -> Dict[str, Any]:
    """The settings one recipe cell fixes, as a nested dict of yacs keys.

    ``schedule="recipe"``: exactly what ``d2_norms.recipes.render_config`` writes into the yacs
    twin (depth, norms, schedule at ``ims_per_gpu``, per-cell extras); ``"base"``: the norm keys,
    depth (if given) and ``IMS_PER_BATCH = ims_per_gpu x reference_world_size``."""
    import yaml

    from d2_norms import recipes

    check_recipe(recipe)
    detector, norm, ims = recipe["detector"], recipe["norm"], int(recipe["ims_per_gpu"])
    if recipe.get("schedule", "recipe") == "recipe":
        text = recipes.render_config(detector, int(recipe.get("depth") or 50), norm, ims,
                                     recipe.get("length") or "3x", recipe.get("frn_base_lr"))
        fields = yaml.safe_load(text)
        fields.pop("_BASE_", None)
        fields.pop("OUTPUT_DIR", None)  # train.output_dir (None: the base file's)
        return fields
    ref = int(recipe.get("reference_world_size") or 1)
    flat: Dict[str, Any] = dict(recipes.norm_fields(detector, norm))
    if recipe.get("depth"):
        flat["MODEL.RESNETS.DEPTH"] = int(recipe["depth"])
    flat["SOLVER.IMS_PER_BATCH"] = ims * ref
    flat["SOLVER.REFERENCE_WORLD_SIZE"] = ref
    return recipes._nested(flat)


def _merge(cfg, nested: Mapping, where: str) -> None:
    """Merge a nested dict of yacs keys into ``cfg``; an unknown key names ``where`` and close
    keys (ConfigKeyError, exit code 2)."""
    from d2_norms.engine.errors import ConfigKeyError, flatten_keys, unknown_key_message
    from d2_norms.engine.preflight import _key_from_message

    pairs = []
    for key, value in _dotted(nested):
        pairs += [key, tuple(value) if isinstance(value, list) and _is_tuple(cfg, key) else value]
    try:
        cfg.merge_from_list(pairs)
    except (KeyError, AssertionError, ValueError) as e:
        key = _key_from_message(str(e.args[0] if e.args else e))
        if key is None:
            raise ConfigKeyError(f"{where}: {e}") from None
        raise ConfigKeyError(unknown_key_message(key, flatten_keys(cfg), where)) from None


def _is_tuple(cfg, key: str) -> bool:
    return isinstance(_get(cfg, key), tuple)


def recipe_settings(base: str, recipe: Mapping, train: Optional[Mapping] = None,
                    overrides: Optional[Mapping] = None):
    """The engine's settings (a yacs CfgNode, not frozen): ``base`` (a yacs file) + the recipe
    cell's fields + ``overrides`` (nested yacs keys) + the non-None ``train`` entries."""
    from d2_norms.engine.preflight import load_config

    recipe, train, overrides = _plain(recipe), _plain(train) or {}, _plain(overrides) or {}
    cfg = load_config(base, [])
    _merge(cfg, recipe_fields(recipe), "the recipe's fields")
    if overrides:
        _merge(cfg, overrides, "settings.overrides")
    unknown = [k for k, _ in _dotted(train) if k not in TRAIN_KEYS]
    if unknown:
        from d2_norms.engine.errors import ConfigKeyError

        close = {k: difflib.get_close_matches(k, list(TRAIN_KEYS), n=1) for k in unknown}
        raise ConfigKeyError(
            "unknown train entr" + ("ies " if len(unknown) > 1 else "y ") + ", ".join(
                f"train.{k}" + (f" (did you mean train.{close[k][0]}?)" if close[k] else "")
                for k in unknown) + "; d2_norms' lazy trainer reads train."
            + ", train.".join(TRAIN_KEYS) + " (other settings: settings.overrides.<YACS KEY>)")
    chosen = {TRAIN_KEYS[k]: v for k, v in _dotted(train) if v is not None}
    if chosen:
        _merge(cfg, _nested(chosen), "train")
    return cfg


def _nested(flat: Mapping) -> Dict:
    from d2_norms import recipes

    return recipes._nested(dict(flat))


def build_model(cfg):
    """The detectron2 model of ``cfg`` (the settings), through d2_norms' trainer (the same
    builders, and norm errors with the config keys, as ``tools/train_net.py``)."""
    from d2_norms.engine.trainer import Trainer

    return Trainer.build_model(cfg)


def build_optimizer(cfg, model):
    """SGD over :func:`d2_norms_optimizer_params` groups with the settings' lr, momentum, weight
    decays and gradient clipping (AGC included): ``d2_norms.solver.build_optimizer``."""
    from d2_norms.solver import build_optimizer as build

    if model is None:
        raise ValueError("build_optimizer: model is None; the trainer sets optimizer.model "
                         "before instantiating (as detectron2's optimizer.params.model)")
    return build(cfg, model)
