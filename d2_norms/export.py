"""TorchScript export of d2_norms (and stock) detectron2 models through detectron2's export API.

* :func:`prepare_for_export` - an eval-mode copy of the model with every weight-standardized
  conv (GNWS's ``WSConv2d``, NF's ``ScaledStdConv2d``) folded into a plain detectron2 ``Conv2d``
  (NF paper sec. 4.2: "free at inference"); the eager model is left untouched, so exported
  outputs can be checked against it.
* :func:`export_torchscript` - ``method="trace"``: ``detectron2.export.TracingAdapter`` +
  ``torch.jit.trace`` (as detectron2's ``tools/deploy/export_model.py``: R-CNN models are traced
  through ``inference(..., do_postprocess=False)``, so masks are the per-ROI mask probabilities);
  ``method="script"``: ``detectron2.export.scripting_with_instances``.
* :func:`run_eager` / :class:`ExportedModel` give both sides in one format
  (``{field: tensor}`` per image), :func:`compare_outputs` the largest differences.

On detectron2 v0.6 ``import detectron2.export`` needs caffe2; ``d2_norms.compat`` makes it
importable without (see docs/export.md).
"""
import copy
import io
from typing import Dict, List, Optional

import torch
from torch import nn

from .fileio import atomic_write_bytes
from .layers.weight_std import _Conv2dBase, fold_weight_standardization

__all__ = [
    "EXPORT_METHODS",
    "ExportError",
    "ExportedModel",
    "prepare_for_export",
    "standardized_convs",
    "instance_fields",
    "export_torchscript",
    "run_eager",
    "compare_outputs",
    "save_torchscript",
]

EXPORT_METHODS = ("trace", "script")
_BOX_FIELDS = ("pred_boxes", "proposal_boxes")


class ExportError(RuntimeError):
    """The model cannot be exported as asked (method, architecture) or its export differs."""


def standardized_convs(model: nn.Module) -> List[str]:
    """Names of the modules that still standardize their weights in forward (WS / Scaled WS)."""
    return [name for name, m in model.named_modules() if isinstance(m, _Conv2dBase)]


def prepare_for_export(model: nn.Module) -> nn.Module:
    """An eval-mode deep copy of ``model`` with weight standardization folded into plain convs."""
    exported = copy.deepcopy(model).eval()
    fold_weight_standardization(exported)
    left = standardized_convs(exported)
    if left:  # pragma: no cover - fold_weight_standardization walks every child
        raise ExportError(f"weight standardization left unfolded in {left}")
    return exported


def _is_rcnn(model: nn.Module) -> bool:
    from detectron2.modeling import GeneralizedRCNN

    return isinstance(model, GeneralizedRCNN)


def instance_fields(model: nn.Module) -> Dict[str, type]:
    """The ``Instances`` fields (and types) a model's inference produces, for
    ``scripting_with_instances``."""
    from detectron2.modeling import GeneralizedRCNN, RetinaNet
    from detectron2.structures import Boxes

    if isinstance(model, GeneralizedRCNN):
        fields = {"proposal_boxes": Boxes, "objectness_logits": torch.Tensor,
                  "pred_boxes": Boxes, "scores": torch.Tensor, "pred_classes": torch.Tensor}
        if getattr(model.roi_heads, "mask_on", False):
            fields["pred_masks"] = torch.Tensor
        return fields
    if isinstance(model, RetinaNet):
        return {"pred_boxes": Boxes, "scores": torch.Tensor, "pred_classes": torch.Tensor}
    raise ExportError(f"export supports GeneralizedRCNN and RetinaNet models, got "
                      f"{type(model).__name__}")


def _image_only(inputs):
    # The exported graph takes the image alone (height/width would be traced as constants).
    return [{"image": x["image"]} for x in inputs]


def _fields_of(instances, names) -> Dict[str, torch.Tensor]:
    out = {}
    for name in names:
        value = instances.get(name) if hasattr(instances, "get") else getattr(instances, name)
        if hasattr(value, "tensor"):  # Boxes
            value = value.tensor
        out[name] = value
    return out


def _postprocess(scripted_instances, names, image):
    from detectron2.modeling.postprocessing import detector_postprocess
    from detectron2.structures import Instances

    height, width = image.shape[-2], image.shape[-1]
    inst = Instances((height, width))
    for name in names:
        inst.set(name, getattr(scripted_instances, name))
    return detector_postprocess(inst, height, width)


def _output_names(model) -> List[str]:
    names = ["pred_boxes", "scores", "pred_classes"]
    if _is_rcnn(model) and getattr(model.roi_heads, "mask_on", False):
        names.append("pred_masks")
    return names


@torch.no_grad()
def run_eager(model: nn.Module, inputs) -> List[Dict[str, torch.Tensor]]:
    """Eager outputs in the exported format: R-CNN without postprocessing (as exported),
    RetinaNet as its forward returns them."""
    model.eval()
    inputs = _image_only(inputs)
    names = _output_names(model)
    if _is_rcnn(model):
        results = model.inference(inputs, do_postprocess=False)
    else:
        results = [r["instances"] for r in model(inputs)]
    return [_fields_of(r, names) for r in results]


class ExportedModel:
    """A TorchScript module plus what is needed to call it like the eager model."""

    def __init__(self, module, method: str, names: List[str], rcnn: bool, schema=None):
        self.module = module
        self.method = method
        self.names = names
        self.rcnn = rcnn
        self.schema = schema  # TracingAdapter's outputs schema (trace only)

    @torch.no_grad()
    def __call__(self, inputs) -> List[Dict[str, torch.Tensor]]:
        inputs = _image_only(inputs)
        if self.method == "trace":
            # The traced graph takes one image tensor (TracingAdapter flattens the inputs).
            outs = []
            for x in inputs:
                flat = self.module(x["image"])
                result = self.schema(flat)
                outs.append(_fields_of(result[0]["instances"], self.names))
            return outs
        if self.rcnn:
            results = self.module.inference(inputs, do_postprocess=False)
            return [_fields_of(r, self.names) for r in results]
        outs = []
        for result, x in zip(self.module(inputs), inputs):
            if isinstance(result, dict):
                outs.append(_fields_of(result["instances"], self.names))
            else:
                # A scripted RetinaNet returns its Instances before postprocessing; apply the
                # step its eager forward applies (detector_postprocess at the input size).
                outs.append(_fields_of(_postprocess(result, self.names, x["image"]), self.names))
        return outs

    def with_module(self, module) -> "ExportedModel":
        """The same calling convention around another module (e.g. the re-loaded file)."""
        return ExportedModel(module, self.method, self.names, self.rcnn, self.schema)


def export_torchscript(model: nn.Module, inputs, method: str = "trace") -> ExportedModel:
    """Export an eval-mode (already folded: :func:`prepare_for_export`) model to TorchScript.

    ``inputs``: detectron2-format inputs (``[{"image": CHW tensor}, ...]``); tracing uses the
    first image, whose size the traced graph is specialised to in places (as any detectron2
    trace: see docs/export.md).
    """
    if method not in EXPORT_METHODS:
        raise ExportError(f"export method {method!r} is not supported; use one of "
                          f"{', '.join(EXPORT_METHODS)}")
    if model.training:
        raise ExportError("export needs an eval-mode model (call model.eval() / "
                          "prepare_for_export(model))")
    left = standardized_convs(model)
    if left:
        raise ExportError(f"{len(left)} convs still standardize their weights (e.g. {left[0]}); "
                          "fold them first with d2_norms.export.prepare_for_export(model)")
    from detectron2.export import TracingAdapter, scripting_with_instances

    names = _output_names(model)
    rcnn = _is_rcnn(model)
    if method == "trace":
        image = inputs[0]["image"]
        traced_inputs = [{"image": image}]
        inference = None
        if rcnn:
            def inference(m, batched):
                # do_postprocess=False: per-ROI mask probabilities, as detectron2's deploy tool.
                return [{"instances": m.inference(batched, do_postprocess=False)[0]}]
        adapter = TracingAdapter(model, traced_inputs, inference)
        with torch.no_grad():
            traced = torch.jit.trace(adapter, (image,), check_trace=False)
        return ExportedModel(traced, method, names, rcnn, adapter.outputs_schema)
    instance_fields(model)  # clear error for other architectures
    with torch.no_grad():
        scripted = scripting_with_instances(model, instance_fields(model))
    return ExportedModel(scripted, method, names, rcnn)


def compare_outputs(expected: List[Dict[str, torch.Tensor]],
                    actual: List[Dict[str, torch.Tensor]]) -> Dict[str, float]:
    """Largest absolute difference per field over all images; ExportError when the number of
    images, detections or the predicted classes differ."""
    if len(expected) != len(actual):
        raise ExportError(f"{len(expected)} images in, {len(actual)} results out")
    worst: Dict[str, float] = {}
    for i, (exp, act) in enumerate(zip(expected, actual)):
        for name, e in exp.items():
            a = act[name]
            if tuple(e.shape) != tuple(a.shape):
                raise ExportError(f"image {i}: {name} has shape {tuple(a.shape)} exported, "
                                  f"{tuple(e.shape)} eager")
            if e.dtype in (torch.int64, torch.int32, torch.bool):
                if not torch.equal(e, a):
                    raise ExportError(f"image {i}: {name} differ between eager and exported")
                diff = 0.0
            else:
                diff = float((e.float() - a.float()).abs().max()) if e.numel() else 0.0
            worst[name] = max(worst.get(name, 0.0), diff)
    return worst


def save_torchscript(module, path: str) -> None:
    """Write a TorchScript module atomically (never a half-written file at ``path``)."""
    buffer = io.BytesIO()
    torch.jit.save(module, buffer)
    data = buffer.getvalue()
    atomic_write_bytes(path, lambda f: f.write(data))


def load_torchscript(path: str, map_location: Optional[str] = "cpu"):
    return torch.jit.load(path, map_location=map_location)
