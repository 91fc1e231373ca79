# SGD over d2_norms' parameter groups: zero weight decay on every normalizer parameter (FRN
# gamma / beta / tau, TLU tau, GN, Scaled WS gains and biases, SkipInit; GN sec. 4.2, NF App.
# B.1), and AGC (NFNets sec. 4.1) in the optimizer itself where the recipe asks for it (NF), so
# every trainer that instantiates this node clips. lr, momentum and weight decay: the recipe's.
from detectron2.config import LazyCall as L

from d2_norms.solver import SGDWithAGC, d2_norms_optimizer_params

SGD = L(SGDWithAGC)(
    # params.model is set to the model by the trainer (detectron2's convention)
    params=L(d2_norms_optimizer_params)(weight_decay_norm=0.0, agc=True),
    lr="${d2n_recipe:lr}",
    momentum="${d2n_recipe:momentum}",
    weight_decay="${d2n_recipe:weight_decay}",
    clipping="${d2n_recipe:agc_clipping}",  # None: plain SGD
)
