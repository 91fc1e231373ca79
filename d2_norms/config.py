"""``add_d2_norms_config(cfg)``: every config key d2_norms adds to detectron2's defaults;
``get_dotted``: a ``"MODEL.RESNETS.NORM"``-style lookup in a config or a parsed YAML mapping."""
from typing import Any, Mapping

from detectron2.config import CfgNode as CN


def add_d2_norms_config(cfg: CN) -> CN:
    """Add d2_norms' keys (backbones, evaluation, schedules) to a detectron2 config, in place.

    Idempotent: calling it twice leaves the config unchanged.
    """
    from d2_norms.evaluation import add_evaluation_config
    from d2_norms.modeling import add_backbone_config
    from d2_norms.modeling.heads import add_heads_config

    add_backbone_config(cfg)
    add_heads_config(cfg)
    add_evaluation_config(cfg)
    return cfg


def meta_architecture_family(name: str) -> str:
    """"RetinaNet" or "GeneralizedRCNN" for a META_ARCHITECTURE name that is (a subclass of)
    one of them, e.g. d2_norms' "D2NormsRetinaNet"; otherwise the name itself (also for names
    that are not registered, e.g. in the config of a run made with another plugin)."""
    from detectron2.modeling import META_ARCH_REGISTRY, GeneralizedRCNN, RetinaNet

    try:
        cls = META_ARCH_REGISTRY.get(name)
    except KeyError:
        return name
    for family in (RetinaNet, GeneralizedRCNN):
        if isinstance(cls, type) and issubclass(cls, family):
            return family.__name__
    return name


def get_dotted(node: Mapping, dotted: str, default: Any = None) -> Any:
    """``node["A"]["B"]["C"]`` for ``dotted = "A.B.C"``, or ``default`` where a level is missing
    or not a mapping."""
    for key in dotted.split("."):
        if not isinstance(node, Mapping) or key not in node:
            return default
        node = node[key]
    return node
