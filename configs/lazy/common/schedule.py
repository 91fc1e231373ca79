# The recipe's lr multiplier: warm-up (linear, or the FRN paper's cosine ramp) then cosine decay
# (RetinaNet, FRN sec. 4.3) or steps (Mask R-CNN, GN paper), at the recipe's total batch; built
# by the same function as the yacs cells' scheduler.
from detectron2.config import LazyCall as L

from d2_norms.lazy.recipe import recipe_lr_multiplier

lr_multiplier = L(recipe_lr_multiplier)(
    lr_scheduler_name="${d2n_recipe:lr_scheduler_name}",
    max_iter="${train.max_iter}",
    steps="${d2n_recipe:steps}",
    warmup_iters="${d2n_recipe:warmup_iters}",
    warmup_method="${d2n_recipe:warmup_method}",
    warmup_factor=0.001,
)
