"""LazyConfig support: detectron2-style LazyConfigs with d2_norms' components and recipe.

d2_norms' LazyConfigs (``configs/lazy/``) are written the way detectron2 writes its own
(``configs/new_baselines``): a few lines importing ``common`` nodes and editing them:

- ``model``: a graph of d2_norms components with explicit arguments
  (``configs/lazy/common/models``; :mod:`d2_norms.lazy.components`), editable in place
  (``model.backbone.bottom_up.depth=101``, ``model.backbone.norm=GN``);
- ``dataloader``: detectron2's COCO loader nodes with d2_norms' checked mapper and evaluator;
- ``optimizer``: ``SGDWithAGC`` over :func:`d2_norms_optimizer_params` (no weight decay on any
  normalizer parameter; AGC inside the optimizer for NF, so every trainer clips);
- ``lr_multiplier`` and ``train`` (detectron2's names);
- ``recipe``: ``detector``, ``norm``, ``ims_per_gpu``, ``num_gpus``, ...: the values that depend
  on them are ``${d2n_recipe:KEY}`` interpolations computed by one function
  (:func:`d2_norms.lazy.recipe.recipe_values`), so ``recipe.norm=GN recipe.ims_per_gpu=4`` on
  the command line selects any cell of the FRN Table 6 / GN Table 7 matrices.

Both trainers run them: detectron2's own ``tools/lazyconfig_train_net.py`` and d2_norms'
(:mod:`d2_norms.lazy.engine`), which also runs detectron2's own LazyConfigs and adds its
guarantees. :func:`~d2_norms.lazy.components.d2_norms_model` rebuilds a detectron2 model graph
(``configs/common/models/*.py``) from d2_norms' components for a normalizer. In a user's own
config, ``optimizer.params = L(d2_norms_optimizer_params)(weight_decay_norm=0.0)`` replaces
detectron2's ``get_default_optimizer_params`` (which weight-decays FRN / TLU / Scaled WS
parameters).
"""
from d2_norms.solver.optimizer import d2_norms_optimizer_params

__all__ = ["d2_norms_optimizer_params", "d2_norms_model", "recipe_values"]


def __getattr__(name):  # the heavier modules load when used
    if name == "d2_norms_model":
        from .components import d2_norms_model

        return d2_norms_model
    if name == "recipe_values":
        from .recipe import recipe_values

        return recipe_values
    raise AttributeError(name)
