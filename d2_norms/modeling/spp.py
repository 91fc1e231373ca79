"""Signal Propagation Plots (NF paper sec. 3 and App. F).

A backbone is built at initialisation and fed a batch of N(0,1) inputs; at the output of every
residual block we record, over the N, H, W axes of an NCHW tensor y:

* average channel squared mean: ``mean_c(mean_nhw(y)^2)``;
* average channel variance: ``mean_c(var_nhw(y))`` (population variance, as ``np.var``);
* the same variance at the end of the residual branch, before it is merged with the skip path.

Any detectron2 backbone works: FPN backbones are measured on their ``bottom_up`` network;
detectron2 ``ResNet``-style networks (``stage_names``/``stages``) are walked stage by stage,
others by their innermost ``CNNBlockBase`` modules. The residual-branch end is the block's
``branch_out`` module (d2_norms blocks), else ``f`` (detectron2 RegNet), else its last
``conv3``/``conv2`` (detectron2 ResNet blocks); NaN when none is found.
"""
import csv
import math
import os
from dataclasses import asdict, dataclass, fields
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from detectron2.layers import CNNBlockBase

__all__ = [
    "SPPRecord",
    "channel_stats",
    "residual_blocks",
    "signal_propagation",
    "spp_from_config",
    "write_spp_csv",
    "plot_spp",
]


@dataclass
class SPPRecord:
    block: int  # 1-based depth index over all residual blocks
    stage: str
    block_in_stage: int  # 0-based
    stage_end: bool
    avg_channel_squared_mean: float
    avg_channel_variance: float
    residual_avg_channel_variance: float


def channel_stats(y: torch.Tensor) -> Tuple[float, float]:
    """(average channel squared mean, average channel variance) of an NCHW tensor."""
    if y.dim() != 4:
        raise ValueError(f"expected an NCHW tensor, got shape {tuple(y.shape)}")
    y = y.detach().double()
    mean = y.mean(dim=(0, 2, 3))
    var = y.var(dim=(0, 2, 3), unbiased=False)
    return float((mean ** 2).mean()), float(var.mean())


def _branch_end(block: nn.Module) -> Optional[nn.Module]:
    for name in ("branch_out", "f", "conv3", "conv2"):
        m = getattr(block, name, None)
        if isinstance(m, nn.Module):
            return m
    return None


def residual_blocks(backbone: nn.Module) -> List[Tuple[str, int, nn.Module]]:
    """(stage name, index in stage, block) for every residual block, in forward order."""
    net = getattr(backbone, "bottom_up", backbone)
    if hasattr(net, "stage_names") and hasattr(net, "stages"):
        return [(name, i, block) for name, stage in zip(net.stage_names, net.stages)
                for i, block in enumerate(stage)]
    found = []
    for name, m in net.named_modules():
        if not isinstance(m, CNNBlockBase) or name.split(".")[-1] == "stem":
            continue
        if any(isinstance(c, CNNBlockBase) for c in m.children()):
            continue  # a stage, not a block
        found.append((name.rsplit(".", 1)[0] if "." in name else "", m))
    out, counts = [], {}
    for stage, block in found:
        out.append((stage, counts.get(stage, 0), block))
        counts[stage] = counts.get(stage, 0) + 1
    return out


@torch.no_grad()
def signal_propagation(backbone: nn.Module, *, batch_size: int = 8, size: int = 224,
                       in_channels: int = 3, seed: int = 0,
                       device: str = "cpu") -> List[SPPRecord]:
    """Statistics at every residual block for one N(0,1) batch (BN uses batch statistics).

    The backbone's state is left as it was: train/eval flags are restored and BN running
    statistics are not updated (momentum 0 during the pass).
    """
    net = getattr(backbone, "bottom_up", backbone)
    blocks = residual_blocks(net)
    if not blocks:
        raise ValueError(f"no residual blocks found in {type(net).__name__}; SPPs need a "
                         "ResNet-like backbone made of detectron2 CNNBlockBase blocks.")
    outputs: Dict[int, torch.Tensor] = {}
    branch: Dict[int, torch.Tensor] = {}
    handles = []
    for k, (_, _, block) in enumerate(blocks):
        handles.append(block.register_forward_hook(
            lambda m, i, o, k=k: outputs.__setitem__(k, channel_stats(o))))
        end = _branch_end(block)
        if end is not None:
            handles.append(end.register_forward_hook(
                lambda m, i, o, k=k: branch.__setitem__(k, channel_stats(o)[1])))

    was_training = {m: m.training for m in net.modules()}
    bn_state = {}
    for m in net.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            bn_state[m] = (m.momentum, None if m.num_batches_tracked is None
                           else m.num_batches_tracked.clone())
            m.momentum = 0.0  # running = 1 * running + 0 * batch: unchanged
    net.train()
    try:
        gen = torch.Generator(device="cpu").manual_seed(seed)
        x = torch.randn(batch_size, in_channels, size, size, generator=gen).to(device)
        net(x)
    finally:
        for h in handles:
            h.remove()
        for m, flag in was_training.items():
            m.training = flag
        for m, (momentum, nbt) in bn_state.items():
            m.momentum = momentum
            if nbt is not None:
                m.num_batches_tracked.copy_(nbt)

    records = []
    for k, (stage, idx, _) in enumerate(blocks):
        sq_mean, var = outputs[k]
        stage_end = k + 1 == len(blocks) or blocks[k + 1][0] != stage
        records.append(SPPRecord(k + 1, stage, idx, stage_end, sq_mean, var,
                                 branch.get(k, math.nan)))
    return records


def spp_from_config(cfg, *, batch_size: int = 8, size: int = 224, seed: int = 0) -> List[SPPRecord]:
    """Build ``cfg.MODEL.BACKBONE.NAME`` at init (seeded) and measure its SPP on CPU."""
    from detectron2.layers import ShapeSpec
    from detectron2.modeling import build_backbone

    torch.manual_seed(seed)
    in_channels = len(cfg.MODEL.PIXEL_MEAN)
    backbone = build_backbone(cfg, ShapeSpec(channels=in_channels))
    return signal_propagation(backbone, batch_size=batch_size, size=size,
                              in_channels=in_channels, seed=seed + 1)


_COLUMNS = [f.name for f in fields(SPPRecord)]


def write_spp_csv(results: Dict[str, List[SPPRecord]], path: str) -> None:
    """One row per (config label, block)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["label"] + _COLUMNS)
        writer.writeheader()
        for label, records in results.items():
            for r in records:
                writer.writerow({"label": label, **asdict(r)})


_PANELS = [
    ("avg_channel_squared_mean", "Average channel squared mean"),
    ("avg_channel_variance", "Average channel variance"),
    ("residual_avg_channel_variance", "Residual average channel variance"),
]


def _use_log(values: Sequence[float]) -> bool:
    positive = [v for v in values if v > 0 and math.isfinite(v)]
    return bool(positive) and max(positive) / min(positive) > 1e3


def plot_spp(results: Dict[str, List[SPPRecord]], path: str, *, logy: str = "auto",
             title: str = "") -> None:
    """Three panels against block depth, one line per config; black dots end a stage.

    logy: "auto" (log scale for a panel whose values span more than 1e3), "yes" or "no".
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if logy not in ("auto", "yes", "no"):
        raise ValueError(f"logy must be 'auto', 'yes' or 'no', got {logy!r}")
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.6))
    for ax, (key, name) in zip(axes, _PANELS):
        all_values = []
        for label, records in results.items():
            xs = [r.block for r in records]
            ys = [getattr(r, key) for r in records]
            all_values += ys
            (line,) = ax.plot(xs, ys, label=label, linewidth=1.5)
            ends = [(x, y) for x, y, r in zip(xs, ys, records) if r.stage_end]
            if ends:
                ax.plot(*zip(*ends), "o", color="black", markersize=4)
        if logy == "yes" or (logy == "auto" and _use_log(all_values)):
            ax.set_yscale("log")
        ax.set_xlabel("Block depth")
        ax.set_title(name)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
