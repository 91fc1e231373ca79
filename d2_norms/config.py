"""``add_d2_norms_config(cfg)``: every config key d2_norms adds to detectron2's defaults."""
from detectron2.config import CfgNode as CN


def add_d2_norms_config(cfg: CN) -> CN:
    """Add d2_norms' keys (backbones, evaluation, schedules) to a detectron2 config, in place.

    Idempotent: calling it twice leaves the config unchanged.
    """
    from d2_norms.evaluation import add_evaluation_config
    from d2_norms.modeling import add_backbone_config

    add_backbone_config(cfg)
    add_evaluation_config(cfg)
    return cfg
