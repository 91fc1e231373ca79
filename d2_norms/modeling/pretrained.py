"""ImageNet-pretrained batch-independent backbones: timm state dicts -> d2_norms backbones.

``convert_timm_state_dict(model_name, state_dict)`` maps the weights of a supported timm model
onto the d2_norms backbone that computes the same function (res2..res5 equal to timm's stage
outputs for the same input, tested in tests/test_pretrained.py) and returns a detectron2
checkpoint dict. ``tools/convert_pretrained.py`` is the command line; docs/pretrained.md the
guide.

| timm model     | d2_norms backbone                                                          |
|----------------|----------------------------------------------------------------------------|
| ``resnet50_gn``  | GN ResNet-50 (``NORM: "GN"``, stride in the 3x3 conv)                   |
| ``nf_resnet50``  | NF-ResNet-50 (``NORM: "NF"``, ``NF.WS_EPS: 1e-5``, ``NF.SHORTCUT_AVG_POOL``) |

The two architectures agree up to three reparametrizations the converter applies exactly:

* timm's Scaled-WS convs all use DeepMind's ReLU gamma constant 1.7139588594436646, the stem
  conv included; d2_norms uses the analytic sqrt(2 / (1 - 1/pi)) = 1.71285855 after a ReLU and
  1 for the stem (its input is the image). The learnable per-channel gain multiplies the same
  weight, so ``gain_d2 = gain_timm * gamma_timm / gamma_d2`` gives identical weights.
* timm's nf_resnet50 has no SkipInit scalar (``skipinit=False``: its residual branches start at
  zero through the last conv's gain instead); d2_norms' ``skip_gain`` is set to 1, which
  multiplies by exactly 1. A timm checkpoint with ``skipinit_gain`` keeps its values.
* timm scales the pre-activation by ``1 / sqrt(Var)``, d2_norms divides by ``sqrt(Var)``: the
  same number up to float rounding.

The written file is a detectron2 checkpoint ``{"model", "__author__", "matching_heuristics"}``
with backbone-local names (``stem.conv1.weight``, ``res2.0.conv1.norm.weight``, ...), the
convention of detectron2's converted ImageNet backbones: ``DetectionCheckpointer`` matches them
to ``backbone.bottom_up.*`` (FPN) or ``backbone.*`` (C4) by suffix.
"""
import dataclasses
import re
from collections import OrderedDict
from typing import Dict, List, Mapping, Optional, Tuple

import torch
from torch import nn

__all__ = [
    "PretrainedSpec",
    "TIMM_MODELS",
    "TIMM_RELU_GAMMA",
    "ConversionError",
    "supported_timm_models",
    "get_timm_spec",
    "backbone_cfg",
    "build_backbone",
    "convert_timm_state_dict",
    "timm_stage_modules",
    "unwrap_state_dict",
]

# timm.models.nfnet._nonlin_gamma["relu"] (from DeepMind's NFNet code): the gain every timm
# NF-ResNet Scaled-WS conv uses (gamma_in_act=False puts it in the conv, the stem conv too).
TIMM_RELU_GAMMA = 1.7139588594436646


class ConversionError(ValueError):
    """The input cannot be converted (unknown model, wrong keys, wrong widths)."""


@dataclasses.dataclass(frozen=True)
class PretrainedSpec:
    """How one timm model maps onto a d2_norms backbone."""

    timm_name: str
    description: str
    # detectron2 config keys (dotted) that make the d2_norms backbone compute timm's function;
    # the fine-tuning configs set the same values (tested).
    cfg_settings: Mapping[str, object]
    # (timm regex, d2_norms template) pairs for the parameter names, and the inverse
    name_rules: Tuple[Tuple[str, str], ...]
    inverse_rules: Tuple[Tuple[str, str], ...]
    # timm keys that have no place in a detection backbone (the classifier)
    ignored: Tuple[str, ...]
    # timm module names whose outputs are res2..res5
    stage_modules: Tuple[str, str, str, str]
    # fine-tuning configs (relative to the repository's configs/)
    finetune_configs: Tuple[str, ...]
    default_output: str


_GN_RULES = (
    (r"^conv1\.weight$", r"stem.conv1.weight"),
    (r"^bn1\.(weight|bias)$", r"stem.conv1.norm.\1"),
    (r"^layer(\d)\.(\d+)\.conv(\d)\.weight$", r"res{L}.\2.conv\3.weight"),
    (r"^layer(\d)\.(\d+)\.bn(\d)\.(weight|bias)$", r"res{L}.\2.conv\3.norm.\4"),
    (r"^layer(\d)\.(\d+)\.downsample\.0\.weight$", r"res{L}.\2.shortcut.weight"),
    (r"^layer(\d)\.(\d+)\.downsample\.1\.(weight|bias)$", r"res{L}.\2.shortcut.norm.\3"),
)
_GN_INVERSE = (
    (r"^stem\.conv1\.weight$", r"conv1.weight"),
    (r"^stem\.conv1\.norm\.(weight|bias)$", r"bn1.\1"),
    (r"^res(\d)\.(\d+)\.conv(\d)\.weight$", r"layer{T}.\2.conv\3.weight"),
    (r"^res(\d)\.(\d+)\.conv(\d)\.norm\.(weight|bias)$", r"layer{T}.\2.bn\3.\4"),
    (r"^res(\d)\.(\d+)\.shortcut\.weight$", r"layer{T}.\2.downsample.0.weight"),
    (r"^res(\d)\.(\d+)\.shortcut\.norm\.(weight|bias)$", r"layer{T}.\2.downsample.1.\3"),
)
_NF_RULES = (
    (r"^stem\.conv\.(weight|bias|gain)$", r"stem.conv1.\1"),
    (r"^stages\.(\d)\.(\d+)\.conv(\d)\.(weight|bias|gain)$", r"res{L}.\2.conv\3.\4"),
    (r"^stages\.(\d)\.(\d+)\.downsample\.conv\.(weight|bias|gain)$", r"res{L}.\2.shortcut.\3"),
    (r"^stages\.(\d)\.(\d+)\.skipinit_gain$", r"res{L}.\2.skip_gain"),
)
_NF_INVERSE = (
    (r"^stem\.conv1\.(weight|bias|gain)$", r"stem.conv.\1"),
    (r"^res(\d)\.(\d+)\.conv(\d)\.(weight|bias|gain)$", r"stages.{T}.\2.conv\3.\4"),
    (r"^res(\d)\.(\d+)\.shortcut\.(weight|bias|gain)$", r"stages.{T}.\2.downsample.conv.\3"),
    (r"^res(\d)\.(\d+)\.skip_gain$", r"stages.{T}.\2.skipinit_gain"),
)

_COMMON_R50 = {
    "MODEL.RESNETS.DEPTH": 50,
    "MODEL.RESNETS.STEM_OUT_CHANNELS": 64,
    "MODEL.RESNETS.RES2_OUT_CHANNELS": 256,
    "MODEL.RESNETS.NUM_GROUPS": 1,
    "MODEL.RESNETS.WIDTH_PER_GROUP": 64,
    # torchvision / timm ResNets stride in the 3x3 conv (detectron2 defaults to the 1x1)
    "MODEL.RESNETS.STRIDE_IN_1X1": False,
    "MODEL.RESNETS.RES5_DILATION": 1,
}

TIMM_MODELS: Dict[str, PretrainedSpec] = {
    "resnet50_gn": PretrainedSpec(
        timm_name="resnet50_gn",
        description="ResNet-50 with GroupNorm (G=32, eps 1e-5) -> d2_norms GN ResNet-50",
        cfg_settings=dict(_COMMON_R50, **{"MODEL.RESNETS.NORM": "GN"}),
        name_rules=_GN_RULES,
        inverse_rules=_GN_INVERSE,
        ignored=("fc.weight", "fc.bias"),
        stage_modules=("layer1", "layer2", "layer3", "layer4"),
        finetune_configs=("COCO-finetune/mask_rcnn_R_50_FPN_3x_gn_timm.yaml",
                          "COCO-finetune/retinanet_R_50_FPN_3x_gn_timm.yaml"),
        default_output="pretrained/timm_resnet50_gn.pth",
    ),
    "nf_resnet50": PretrainedSpec(
        timm_name="nf_resnet50",
        description="NF-ResNet-50 (timm NormFreeNet) -> d2_norms NF-ResNet-50",
        cfg_settings=dict(_COMMON_R50, **{
            "MODEL.RESNETS.NORM": "NF",
            "MODEL.D2NORMS.NF.ALPHA": 0.2,
            "MODEL.D2NORMS.NF.ACTIVATION": "relu",
            "MODEL.D2NORMS.NF.SCALED_WS": True,
            "MODEL.D2NORMS.NF.WS_EPS": 1e-5,
            "MODEL.D2NORMS.NF.SHORTCUT_AVG_POOL": True,
            # overwritten by the weights (1, see the module docstring); 1 also means "no
            # SkipInit" for anything not loaded from the file
            "MODEL.D2NORMS.NF.SKIP_GAIN_INIT": 1.0,
        }),
        name_rules=_NF_RULES,
        inverse_rules=_NF_INVERSE,
        ignored=("head.fc.weight", "head.fc.bias"),
        stage_modules=("stages.0", "stages.1", "stages.2", "stages.3"),
        finetune_configs=("COCO-finetune/mask_rcnn_NF_R_50_FPN_3x_timm.yaml",
                          "COCO-finetune/retinanet_NF_R_50_FPN_3x_timm.yaml"),
        default_output="pretrained/timm_nf_resnet50.pth",
    ),
}


def supported_timm_models() -> List[str]:
    return sorted(TIMM_MODELS)


def get_timm_spec(model_name: str) -> PretrainedSpec:
    """The conversion rules of ``model_name``; ConversionError listing the supported ones."""
    name = model_name.split(".", 1)[0]  # "resnet50_gn.a1h_in1k": the pretrained tag is a weight set
    if name not in TIMM_MODELS:
        raise ConversionError(
            f"no converter for timm model {model_name!r}; supported: "
            f"{', '.join(supported_timm_models())}. Other timm ResNets differ in stem, "
            "downsampling or norm and would not compute the same function here.")
    return TIMM_MODELS[name]


def timm_stage_modules(model_name: str) -> Tuple[str, ...]:
    """timm module names whose outputs are res2..res5 of the converted backbone."""
    return get_timm_spec(model_name).stage_modules


def _rename(key: str, rules, stage_offset: int, placeholder: str) -> Optional[str]:
    for pattern, template in rules:
        m = re.match(pattern, key)
        if m:
            if "{" in template:
                template = template.replace("{" + placeholder + "}",
                                            str(int(m.group(1)) + stage_offset))
            return m.expand(template)
    return None


def _timm_to_d2_name(spec: PretrainedSpec, key: str) -> Optional[str]:
    # timm: layer1..4 (resnet) / stages.0..3 (nfnet); d2: res2..res5
    offset = 1 if spec.name_rules is _GN_RULES else 2
    return _rename(key, spec.name_rules, offset, "L")


def _d2_to_timm_name(spec: PretrainedSpec, key: str) -> Optional[str]:
    offset = -1 if spec.inverse_rules is _GN_INVERSE else -2
    return _rename(key, spec.inverse_rules, offset, "T")


def backbone_cfg(model_name: str, base=None):
    """A detectron2 config whose ``build_d2n_resnet_backbone`` is the converted backbone."""
    from detectron2.config import get_cfg

    from d2_norms.config import add_d2_norms_config

    spec = get_timm_spec(model_name)
    cfg = base.clone() if base is not None else add_d2_norms_config(get_cfg())
    cfg.defrost()
    for dotted, value in spec.cfg_settings.items():
        node = cfg
        *path, leaf = dotted.split(".")
        for part in path:
            node = node[part]
        node[leaf] = value
    cfg.MODEL.RESNETS.OUT_FEATURES = ["res2", "res3", "res4", "res5"]
    cfg.MODEL.BACKBONE.FREEZE_AT = 0
    return cfg


def build_backbone(model_name: str, base=None) -> nn.Module:
    """The d2_norms ResNet (no FPN) the converted weights of ``model_name`` belong to."""
    from detectron2.layers import ShapeSpec

    from .backbone import build_d2n_resnet_backbone

    return build_d2n_resnet_backbone(backbone_cfg(model_name, base), ShapeSpec(channels=3))


def _show(keys, n=10) -> str:
    keys = list(keys)
    return ", ".join(keys[:n]) + (f", ... ({len(keys)} in all)" if len(keys) > n else "")


def _conv_gammas(backbone: nn.Module) -> Dict[str, float]:
    """``{"res2.0.conv1.gain": gamma}`` for every Scaled-WS conv of ``backbone``."""
    return {f"{name}.gain": float(m.gamma) for name, m in backbone.named_modules()
            if hasattr(m, "gamma") and isinstance(getattr(m, "gain", None), nn.Parameter)}


def convert_timm_state_dict(model_name: str, state_dict: Mapping[str, torch.Tensor],
                            backbone: Optional[nn.Module] = None) -> Dict[str, object]:
    """A detectron2 checkpoint dict holding ``state_dict`` (timm's) in d2_norms' backbone.

    Checks every name and shape against the backbone (built from the spec when not given):
    ConversionError names the missing / unexpected timm keys or the mismatched widths.
    """
    spec = get_timm_spec(model_name)
    if not isinstance(state_dict, Mapping) or not all(
            isinstance(k, str) and torch.is_tensor(v) for k, v in state_dict.items()):
        raise ConversionError(
            f"the checkpoint is not a state dict of {spec.timm_name} (a mapping from parameter "
            "names to tensors); pass the file timm's model.state_dict() was saved to, or a "
            "checkpoint holding it under 'state_dict' or 'model'.")
    if backbone is None:
        backbone = build_backbone(model_name)
    target = backbone.state_dict()
    gammas = _conv_gammas(backbone)

    expected = {}  # timm name -> d2 name, for every backbone entry
    synthesized = {}  # d2 entries timm may lack (SkipInit scalar)
    for d2_key in target:
        timm_key = _d2_to_timm_name(spec, d2_key)
        if timm_key is None:
            raise ConversionError(f"internal: no timm name for d2_norms entry {d2_key}")
        if d2_key.endswith(".skip_gain"):
            synthesized[d2_key] = timm_key
        else:
            expected[timm_key] = d2_key
    unexpected = [k for k in state_dict if k not in expected and k not in spec.ignored
                  and k not in synthesized.values()]
    missing = [k for k in expected if k not in state_dict]
    if missing or unexpected:
        lines = [f"the checkpoint is not a state dict of timm's {spec.timm_name}:"]
        if missing:
            lines.append(f"  missing keys ({len(missing)}): {_show(missing)}")
        if unexpected:
            lines.append(f"  unexpected keys ({len(unexpected)}): {_show(unexpected)}")
        lines.append(f"  Convert it with the timm model name it was saved from (supported: "
                     f"{', '.join(supported_timm_models())}).")
        raise ConversionError("\n".join(lines))
    shapes = [(k, tuple(state_dict[k].shape), tuple(target[d].shape))
              for k, d in expected.items() if tuple(state_dict[k].shape) != tuple(target[d].shape)]
    if shapes:
        shown = "; ".join(f"{k}: {a} in the checkpoint, {b} in {spec.timm_name}"
                          for k, a, b in shapes[:5])
        raise ConversionError(
            f"width mismatch: {len(shapes)} tensors have other shapes than timm's "
            f"{spec.timm_name} ({shown}{' ...' if len(shapes) > 5 else ''}). The checkpoint "
            "belongs to another width/depth variant; convert only the supported models as "
            "published.")

    model = OrderedDict()
    for d2_key in target:
        if d2_key in synthesized:
            timm_key = synthesized[d2_key]
            value = (state_dict[timm_key] if timm_key in state_dict
                     else torch.ones_like(target[d2_key]))
        else:
            value = state_dict[_d2_to_timm_name(spec, d2_key)]
        value = value.detach().to(device="cpu", dtype=target[d2_key].dtype).clone()
        if d2_key in gammas:
            # the same per-channel weight scale with d2_norms' gamma (module docstring)
            value = (value.double() * (TIMM_RELU_GAMMA / gammas[d2_key])).to(value.dtype)
        if not torch.isfinite(value).all():
            raise ConversionError(f"{_d2_to_timm_name(spec, d2_key)} holds non-finite values")
        model[d2_key] = value
    from d2_norms.config_checks import NORM_RECORD

    # what the file holds: the backbone's normalizer, checked when a config loads it
    record = {"norms": {"MODEL.RESNETS.NORM": spec.cfg_settings["MODEL.RESNETS.NORM"]},
              "source": f"timm {spec.timm_name}"}
    return {"model": model, "__author__": f"d2_norms convert_pretrained (timm {spec.timm_name})",
            "matching_heuristics": True, NORM_RECORD: record}


def unwrap_state_dict(obj) -> Mapping:
    """The state dict inside a loaded timm checkpoint file (plain, or under a common key)."""
    if isinstance(obj, Mapping):
        for key in ("state_dict", "model"):
            if key in obj and isinstance(obj[key], Mapping):
                return obj[key]
    return obj

