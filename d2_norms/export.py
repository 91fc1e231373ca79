"""TorchScript export of d2_norms (and stock) detectron2 models through detectron2's export API.

* :func:`prepare_for_export` - an eval-mode copy of the model with every weight-standardized
  conv (GNWS's ``WSConv2d``, NF's ``ScaledStdConv2d``) folded into a plain detectron2 ``Conv2d``
  (NF paper sec. 4.2: "free at inference"); the eager model is left untouched, so exported
  outputs can be checked against it.
* :func:`export_torchscript` - ``method="trace"``: ``detectron2.export.TracingAdapter`` +
  ``torch.jit.trace`` (as detectron2's ``tools/deploy/export_model.py``: R-CNN models are traced
  through ``inference(..., do_postprocess=False)``, so masks are the per-ROI mask probabilities);
  ``method="script"``: ``detectron2.export.scripting_with_instances``.
  The scripted file is wrapped so that it returns plain tensors (``List[Dict[str, Tensor]]``):
  it loads and runs with ``torch`` + ``torchvision`` alone (no detectron2 ``patch_instances``).
* :func:`run_eager` / :class:`ExportedModel` give both sides in one format
  (``{field: tensor}`` per image), :func:`compare_outputs` the largest differences.
  :func:`run_eager` runs FRN with its eager kernels (:func:`eager_frn_kernels`): the kernels an
  export contains (TorchScript cannot hold the ``torch.compile`` ones), so that a comparison
  measures the export, not two summation orders.
* :func:`output_fields` - the outputs' names, order, dtypes and shapes (the schema file);
  checking the exported file in a fresh process and writing it only when the check passes is
  :mod:`d2_norms.export_check`.

On detectron2 v0.6 ``import detectron2.export`` needs caffe2; ``d2_norms.compat`` makes it
importable without (see docs/export.md).
"""
import contextlib
import copy
import io
from typing import Dict, List, Optional, Tuple

import torch
from torch import nn

from .fileio import atomic_write_bytes
from .layers.weight_std import _Conv2dBase, fold_weight_standardization

__all__ = [
    "EXPORT_METHODS",
    "ExportError",
    "ExportedModel",
    "eager_frn_kernels",
    "output_fields",
    "flat_output_names",
    "prepare_for_export",
    "standardized_convs",
    "instance_fields",
    "export_torchscript",
    "run_eager",
    "compare_outputs",
    "save_torchscript",
]

EXPORT_METHODS = ("trace", "script")

# What each exported output holds (the schema file's "outputs"; shapes: N detections per image).
FIELD_DOCS = {
    "pred_boxes": (["N", 4], "boxes (x1, y1, x2, y2) in pixels of the input image"),
    "scores": (["N"], "detection scores in [0, 1]"),
    "pred_classes": (["N"], "class indices in [0, NUM_CLASSES)"),
    "pred_masks": (["N", 1, "M", "M"],
                   "per-box mask probabilities in [0, 1] on an M x M grid over the box (not "
                   "pasted into the image; detectron2's paste_masks_in_image / "
                   "detector_postprocess does that)"),
    "image_size": ([2], "(height, width) of the input image, which the boxes refer to"),
}


class ExportError(RuntimeError):
    """The model cannot be exported as asked (method, architecture) or its export differs."""


@contextlib.contextmanager
def eager_frn_kernels():
    """FRN runs its eager kernels inside this block; the previous choice (``auto`` / ``eager``
    / ``compiled``, as it was set) is restored afterwards, also on errors.

    An exported graph runs FRN's eager forward kernel as plain ops (TorchScript cannot hold a
    ``torch.compile`` kernel). The compiled kernel sums in another order (~1e-7 relative per
    layer, ~1e-4 px in the boxes of an FRN RetinaNet at 128 px), so an eager reference for an
    export must use the eager kernel to be comparable op for op."""
    from .layers import frn

    previous = getattr(frn, "_IMPL", None) or frn.get_frn_impl()  # as set, e.g. "auto"
    frn.set_frn_impl("eager")
    try:
        yield
    finally:
        frn.set_frn_impl(previous)


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


def _output_names(model) -> List[str]:
    names = ["pred_boxes", "scores", "pred_classes"]
    if _is_rcnn(model) and getattr(model.roi_heads, "mask_on", False):
        names.append("pred_masks")
    return names


@torch.no_grad()
def run_eager(model: nn.Module, inputs) -> List[Dict[str, torch.Tensor]]:
    """Eager outputs in the exported format: R-CNN without postprocessing (as exported),
    RetinaNet as its forward returns them. FRN runs its eager kernels (those an export holds,
    :func:`eager_frn_kernels`)."""
    model.eval()
    inputs = _image_only(inputs)
    names = _output_names(model)
    with eager_frn_kernels():
        if _is_rcnn(model):
            results = model.inference(inputs, do_postprocess=False)
        else:
            results = [r["instances"] for r in model(inputs)]
    return [_fields_of(r, names) for r in results]


# ------------------------------------------------------------------ scripted file's top module
class _ScriptedDetector(nn.Module):
    """The top module of a scripted export: the detectron2 model (scripted with
    ``scripting_with_instances``) called as eager, returning ``List[Dict[str, Tensor]]`` (the
    output fields + ``image_size`` per image) instead of the scripted ``Instances`` class.

    A TorchScript class object cannot be handed to Python in a process that has not defined it
    (``classType INTERNAL ASSERT FAILED ... ScriptedInstances1 is not found``: detectron2's
    ``patch_instances`` defines it, with a per-process counter in its name); plain tensors can,
    so the file loads and runs with torch + torchvision alone."""

    def __init__(self, model: nn.Module, names: List[str]):
        super().__init__()
        self.model = model
        self.names = list(names)

    def _output(self, fields: Dict[str, torch.Tensor],
                image_size: Tuple[int, int]) -> Dict[str, torch.Tensor]:
        out: Dict[str, torch.Tensor] = {}
        for name in self.names:
            out[name] = fields[name]
        out["image_size"] = torch.tensor([image_size[0], image_size[1]])
        return out


class _ScriptedRCNN(_ScriptedDetector):
    def forward(self, inputs: List[Dict[str, torch.Tensor]]) -> List[Dict[str, torch.Tensor]]:
        # as traced (and detectron2's deploy tool): boxes at the input size, per-ROI masks
        results = self.model.inference(inputs, do_postprocess=False)
        return [self._output(r.get_fields(), r.image_size) for r in results]


class _ScriptedRetinaNet(_ScriptedDetector):
    def forward(self, inputs: List[Dict[str, torch.Tensor]]) -> List[Dict[str, torch.Tensor]]:
        # Scripted, detectron2's RetinaNet returns its Instances before postprocessing; this is
        # what its eager forward applies then (detector_postprocess at the input size: scale 1,
        # boxes clipped to the image, empty boxes dropped), so all three agree.
        outs: List[Dict[str, torch.Tensor]] = []
        for r in self.model(inputs):
            h, w = r.image_size
            fields = r.get_fields()
            b = fields["pred_boxes"]
            b = torch.stack((b[:, 0].clamp(min=0, max=w), b[:, 1].clamp(min=0, max=h),
                             b[:, 2].clamp(min=0, max=w), b[:, 3].clamp(min=0, max=h)), dim=-1)
            fields["pred_boxes"] = b
            keep = ((b[:, 2] - b[:, 0]) > 0.0) & ((b[:, 3] - b[:, 1]) > 0.0)
            kept: Dict[str, torch.Tensor] = {}
            for name, value in fields.items():
                kept[name] = value[keep]
            outs.append(self._output(kept, (h, w)))
        return outs


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
            return [self.from_flat(self.module(x["image"])) for x in inputs]
        return [{name: r[name] for name in self.names} for r in self.module(inputs)]

    def from_flat(self, flat) -> Dict[str, torch.Tensor]:
        """A traced graph's flat output tuple (one image) as ``{field: tensor}``."""
        result = self.schema(tuple(flat))
        return _fields_of(result[0]["instances"], self.names)

    def with_module(self, module) -> "ExportedModel":
        """The same calling convention around another module (e.g. the re-loaded file)."""
        return ExportedModel(module, self.method, self.names, self.rcnn, self.schema)


def flat_output_names(schema) -> List[str]:
    """The names of a traced graph's outputs, in the order of its output tuple, from
    ``TracingAdapter.outputs_schema`` (detectron2 flattens dicts and ``Instances`` fields in
    sorted key order, an ``Instances`` followed by its ``image_size``)."""
    from d2_norms.compat import import_detectron2_export

    import_detectron2_export()
    from detectron2.export.flatten import DictSchema, InstancesSchema, ListSchema

    names: List[str] = []

    def walk(s, name):
        if isinstance(s, DictSchema):  # also InstancesSchema
            for key, sub in zip(s.keys, s.schemas):
                walk(sub, key)
            if isinstance(s, InstancesSchema):
                names.append("image_size")
        elif isinstance(s, ListSchema):  # also TupleSchema
            for i, sub in enumerate(s.schemas):
                walk(sub, name if len(s.schemas) == 1 else f"{name}[{i}]")
        else:  # a tensor, or a tensor wrapper such as Boxes
            names.append(name)

    walk(schema, "output")
    return names


def output_fields(exported: "ExportedModel", sample: Dict[str, torch.Tensor]) -> List[dict]:
    """The exported outputs of one image, in order: name, dtype, shape (``N``: detections),
    the shape on the check image, and what the values mean. ``sample``: the exported model's
    ``{field: tensor}`` for one image (with ``image_size`` where the file returns it)."""
    if exported.method == "trace":
        order = flat_output_names(exported.schema)
    else:
        order = list(exported.names) + ["image_size"]
    fields = []
    for name in order:
        shape, meaning = FIELD_DOCS.get(name, (None, ""))
        value = sample.get(name)
        entry = {"name": name,
                 "dtype": str(value.dtype).replace("torch.", "") if value is not None else None,
                 "shape": shape,
                 "check_image_shape": list(value.shape) if value is not None else None,
                 "meaning": meaning}
        fields.append(entry)
    return fields


def export_torchscript(model: nn.Module, inputs, method: str = "trace") -> ExportedModel:
    """Export an eval-mode (already folded: :func:`prepare_for_export`) model to TorchScript.

    ``inputs``: detectron2-format inputs (``[{"image": CHW tensor}, ...]``); tracing uses the
    first image, whose size the traced graph is specialised to in places (as any detectron2
    trace: see docs/export.md). ``method="script"`` returns a module that takes
    ``List[Dict[str, Tensor]]`` (``"image"``) and returns ``List[Dict[str, Tensor]]`` (the output
    fields and ``image_size``), see :class:`_ScriptedDetector`.
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
    from d2_norms.compat import import_detectron2_export

    import_detectron2_export()
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
        with torch.no_grad(), eager_frn_kernels():
            traced = torch.jit.trace(adapter, (image,), check_trace=False)
        return ExportedModel(traced, method, names, rcnn, adapter.outputs_schema)
    fields = instance_fields(model)  # clear error for other architectures
    per_level_bn = [n for n, m in model.named_modules()
                    if type(m).__name__ == "CycleBatchNormList"]
    if per_level_bn:
        raise ExportError(
            f"{type(model).__name__} cannot be scripted: its head normalizes each level with "
            f"its own BN ({per_level_bn[0]} is detectron2's CycleBatchNormList, which "
            "TorchScript cannot index; the same without d2_norms); export it with method "
            "'trace' (--method trace)")
    top = (_ScriptedRCNN if rcnn else _ScriptedRetinaNet)(model, names).eval()
    with torch.no_grad():
        scripted = scripting_with_instances(top, fields)
    return ExportedModel(scripted, method, names, rcnn)


def compare_outputs(expected: List[Dict[str, torch.Tensor]],
                    actual: List[Dict[str, torch.Tensor]]) -> Dict[str, float]:
    """Largest absolute difference per field over all images; ExportError when the number of
    images, detections or the predicted classes differ. A NaN or inf on one side only counts as
    an infinite difference (NaN where both are NaN, and equal infs, as none)."""
    if len(expected) != len(actual):
        raise ExportError(f"{len(expected)} images in, {len(actual)} results out")
    worst: Dict[str, float] = {}
    for i, (exp, act) in enumerate(zip(expected, actual)):
        for name, e in exp.items():
            if name not in act:
                raise ExportError(f"image {i}: no {name} in the exported outputs")
            a = act[name]
            if tuple(e.shape) != tuple(a.shape):
                raise ExportError(f"image {i}: {name} has shape {tuple(a.shape)} exported, "
                                  f"{tuple(e.shape)} eager")
            if e.dtype in (torch.int64, torch.int32, torch.bool):
                if not torch.equal(e, a.to(e.device)):
                    raise ExportError(f"image {i}: {name} differ between eager and exported")
                diff = 0.0
            elif e.numel():
                ef, af = e.float(), a.float().to(e.device)
                same = (ef == af) | (torch.isnan(ef) & torch.isnan(af))
                d = torch.where(same, torch.zeros_like(ef), (ef - af).abs())
                d = torch.where(torch.isnan(d), torch.full_like(d, float("inf")), d)
                diff = float(d.max())
            else:
                diff = 0.0
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
