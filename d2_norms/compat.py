"""Everything that differs between detectron2 versions (v0.6 and main) and library versions.

The one place where d2_norms knows about versions; the rest of the package uses public
detectron2 API only. Two kinds of entries:

* Shims, applied once by ``import d2_norms`` (:func:`apply`), each checking first whether it is
  needed, so on a full detectron2 built from source or on newer libraries they do nothing:
  ``detectron2._C`` / ``torch.ops.detectron2`` placeholders (no compiled ops: calling one raises
  :class:`MissingCompiledOpError` naming it), ``PIL.Image.LINEAR`` (Pillow 10), numpy aliases
  (numpy 1.24), ``pkg_resources`` (setuptools 81), v0.6's ``detectron2.export`` without caffe2.
  ``applied()`` lists what was patched in this process.
* Version-dependent helpers called by d2_norms' code: :func:`create_local_process_group`
  (v0.6 has only the module global ``comm._LOCAL_PROCESS_GROUP``; main has a public function).

Other version differences are handled without branching: ``NormFPN`` sets every attribute
detectron2's ``FPN.__init__`` sets on either version (main's ``square_pad``), checkpoints are read
through ``DetectionCheckpointer.load`` (main guards the private ``_load_file``), the names
detectron2's ``get_norm`` accepts are probed (main adds ``LN``). docs/detectron2_versions.md
lists them.
"""
import importlib.util
import os
import sys
import types
from typing import List

_APPLIED: List[str] = []

# Ops that live in detectron2's C++ extension, by the name v0.6 calls them, mapped to the
# feature a user would recognise in an error message.
COMPILED_OPS = {
    "deform_conv_forward": "deformable convolution (DCN)",
    "deform_conv_backward_input": "deformable convolution (DCN)",
    "deform_conv_backward_filter": "deformable convolution (DCN)",
    "modulated_deform_conv_forward": "modulated deformable convolution (DCNv2)",
    "modulated_deform_conv_backward": "modulated deformable convolution (DCNv2)",
    "box_iou_rotated": "rotated box IoU",
    "nms_rotated": "rotated box NMS",
    "roi_align_rotated_forward": "rotated ROIAlign",
    "roi_align_rotated_backward": "rotated ROIAlign",
    "InstanceAnnotation": "fast COCO evaluation (COCOeval_opt)",
    "COCOevalEvaluateImages": "fast COCO evaluation (COCOeval_opt)",
    "COCOevalAccumulate": "fast COCO evaluation (COCOeval_opt)",
}
# Ops that the extension registers with the dispatcher (TORCH_LIBRARY(detectron2, m) in
# detectron2/layers/csrc/vision.cpp); detectron2 main (and v0.6 for nms_rotated) calls them as
# torch.ops.detectron2.<op>. Schemas are the ones the C++ registration infers from the function
# signatures (unnamed arguments and result _0, _1, ...), so a caller sees the same signature as with the
# real extension.
TORCH_LIBRARY_OPS = {
    "nms_rotated": "nms_rotated(Tensor _0, Tensor _1, float _2) -> Tensor _0",
    "box_iou_rotated": "box_iou_rotated(Tensor _0, Tensor _1) -> Tensor _0",
    "roi_align_rotated_forward": "roi_align_rotated_forward(Tensor _0, Tensor _1, float _2, "
                                 "int _3, int _4, int _5) -> Tensor _0",
    "roi_align_rotated_backward": "roi_align_rotated_backward(Tensor _0, Tensor _1, float _2, "
                                  "int _3, int _4, int _5, int _6, int _7, int _8, "
                                  "int _9) -> Tensor _0",
}
# Keeps the placeholder registrations alive: the dispatcher drops a Library's ops when the
# Library object is garbage-collected.
_TORCH_LIBRARY_PLACEHOLDER = None
# Build-information functions of the extension (detectron2's collect_env_info calls them in
# every default_setup): they answer truthfully that nothing was built instead of raising.
_NOT_BUILT = "not built (detectron2 installed without its C++ extension)"
BUILD_INFO = {
    "get_compiler_version": lambda: _NOT_BUILT,
    "get_cuda_version": lambda: _NOT_BUILT,
    "has_cuda": lambda: False,
}


class MissingCompiledOpError(RuntimeError):
    """Raised when code calls an op of detectron2's C++ extension that is not built."""


def _missing_op_message(qualified_name: str, feature: str) -> str:
    return (
        f"{qualified_name} ({feature}) is not available: this detectron2 was installed without "
        "its C++ extension (no compiled detectron2._C: the pb1-detectron2 sdist has no csrc, and "
        "a source tree installed as pure Python skips it). d2_norms' models do not need it; for "
        "this op install detectron2 from a source tree with a C++ compiler present (from the "
        "d2_norms repository: `python tools/install_detectron2.py --source <detectron2 tree or "
        ".tar.gz> --ops yes`). For COCO evaluation use d2_norms' evaluator "
        "(pycocotools / faster-coco-eval)."
    )


def _missing_op(name: str, feature: str):
    def op(*args, **kwargs):
        raise MissingCompiledOpError(_missing_op_message(f"detectron2._C.{name}", feature))

    op.__name__ = name
    op.__qualname__ = name
    return op


class _MissingExtension(types.ModuleType):
    """Stand-in for ``detectron2._C``: importable, known ops raise a clear error when called.

    Attribute lookups for names that are not ops of the extension raise AttributeError, so
    ``hasattr`` and ``getattr(mod, name, default)`` behave as on any module.
    """

    d2_norms_placeholder = True

    def __getattr__(self, name: str):
        if name in COMPILED_OPS:
            return _missing_op(name, COMPILED_OPS[name])
        if name in BUILD_INFO:
            return BUILD_INFO[name]
        raise AttributeError(f"module 'detectron2._C' (placeholder) has no attribute '{name}'")

    def __dir__(self):
        return sorted(set(super().__dir__()) | set(COMPILED_OPS) | set(BUILD_INFO))


def _install_c_extension_placeholder() -> None:
    if "detectron2._C" in sys.modules:
        return
    if importlib.util.find_spec("detectron2") is None:
        return
    if importlib.util.find_spec("detectron2._C") is not None:
        return  # real compiled extension
    import detectron2

    placeholder = _MissingExtension("detectron2._C", __doc__)
    placeholder.__file__ = None
    sys.modules["detectron2._C"] = placeholder
    detectron2._C = placeholder
    _APPLIED.append("detectron2._C placeholder (no compiled ops)")
    _install_torch_ops_placeholder()


def _torch_op_exists(name: str) -> bool:
    import torch

    try:
        getattr(torch.ops.detectron2, name)
    except (AttributeError, RuntimeError):
        return False
    return True


def _install_torch_ops_placeholder() -> None:
    """Define ``torch.ops.detectron2.<op>`` with the extension's schemas, each raising
    MissingCompiledOpError. Only called when the real ``detectron2._C`` is absent (the real one
    registers these ops itself when it loads); ops that something else already defined are left
    alone."""
    global _TORCH_LIBRARY_PLACEHOLDER
    import torch

    missing = [name for name in TORCH_LIBRARY_OPS if not _torch_op_exists(name)]
    if not missing:
        return
    # FRAGMENT, not DEF: adds to the namespace without claiming it.
    library = torch.library.Library("detectron2", "FRAGMENT")
    for name in missing:
        library.define(TORCH_LIBRARY_OPS[name])
        message = _missing_op_message(f"torch.ops.detectron2.{name}", COMPILED_OPS[name])

        def raise_missing(*args, _message=message, **kwargs):
            raise MissingCompiledOpError(_message)

        # CompositeImplicitAutograd: one kernel for every device, autograd, meta/fake tensors.
        library.impl(name, raise_missing, "CompositeImplicitAutograd")
    _TORCH_LIBRARY_PLACEHOLDER = library
    _APPLIED.append(f"torch.ops.detectron2 placeholder ops ({', '.join(missing)})")


def _patch_pillow() -> None:
    from PIL import Image

    if not hasattr(Image, "LINEAR"):
        # Removed in Pillow 10; it was always an alias of BILINEAR.
        Image.LINEAR = Image.BILINEAR
        _APPLIED.append("PIL.Image.LINEAR = BILINEAR")


def _install_pkg_resources_shim() -> None:
    """detectron2.model_zoo imports pkg_resources (removed from setuptools 81) for one call."""
    try:
        import pkg_resources  # noqa: F401

        return
    except ImportError:
        pass
    import importlib.metadata
    import importlib.resources
    import os

    shim = types.ModuleType("pkg_resources")
    shim.__doc__ = "d2_norms shim: the subset of pkg_resources that detectron2 v0.6 uses."

    def resource_filename(package: str, resource: str) -> str:
        root = importlib.resources.files(package)
        return os.fspath(root.joinpath(resource))

    def resource_exists(package: str, resource: str) -> bool:
        return importlib.resources.files(package).joinpath(resource).exists()

    class DistributionNotFound(Exception):
        pass

    def get_distribution(name: str):
        try:
            version = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError as e:
            raise DistributionNotFound(name) from e
        return types.SimpleNamespace(project_name=name, version=version)

    shim.resource_filename = resource_filename
    shim.resource_exists = resource_exists
    shim.get_distribution = get_distribution
    shim.DistributionNotFound = DistributionNotFound
    sys.modules["pkg_resources"] = shim
    _APPLIED.append("pkg_resources shim (resource_filename, resource_exists, get_distribution)")


def _patch_numpy_aliases() -> None:
    """numpy 1.24 removed np.bool/np.int/np.float; v0.6 uses them (BitMasks, sem-seg eval)."""
    import numpy as np

    for name, value in (("bool", bool), ("int", int), ("float", float), ("object", object),
                        ("str", str)):
        if name not in np.__dict__:
            try:
                setattr(np, name, value)
            except AttributeError:
                continue
            _APPLIED.append(f"numpy.{name} = {value.__name__}")


class MissingCaffe2Error(RuntimeError):
    """Raised by detectron2 v0.6's caffe2-only export API when caffe2 is absent (torch 2.x)."""


_CAFFE2_HINT = (
    "caffe2, which torch 2.x no longer ships (d2_norms made detectron2 v0.6's "
    "detectron2.export importable without it). Export to TorchScript instead: "
    "detectron2.export.TracingAdapter / scripting_with_instances, or tools/export_model.py.")


class _Caffe2Name:
    """Any caffe2 name detectron2.export v0.6 reads at import time (annotations such as
    ``caffe2_pb2.NetDef``): it exists, and raises :class:`MissingCaffe2Error` when called."""

    def __init__(self, name: str):
        self._name = name

    def __getattr__(self, attr: str):
        if attr.startswith("__"):
            raise AttributeError(attr)
        return _Caffe2Name(f"{self._name}.{attr}")

    def __call__(self, *args, **kwargs):
        raise MissingCaffe2Error(f"{self._name} needs {_CAFFE2_HINT}")

    def __repr__(self):
        return f"<{self._name}: caffe2 is not installed>"


class _Caffe2Module(types.ModuleType):
    def __getattr__(self, attr: str):
        if attr.startswith("__"):
            raise AttributeError(attr)
        return _Caffe2Name(f"{self.__name__}.{attr}")


def _make_detectron2_export_importable() -> None:
    """detectron2 v0.6's ``detectron2.export`` imports caffe2 at module top (torch 2.x has none),
    so ``TracingAdapter`` / ``scripting_with_instances`` were unreachable. Import it once with
    stand-in caffe2 modules that exist only during that import (``import caffe2`` still fails
    afterwards), then make the caffe2-only API (Caffe2Tracer, Caffe2Model, export_caffe2_model,
    export_onnx_model) raise :class:`MissingCaffe2Error`. Nothing happens where
    ``detectron2.export`` imports as it is (detectron2 main: caffe2 optional) or caffe2 exists.
    """
    if ("detectron2.export" in sys.modules or importlib.util.find_spec("detectron2") is None
            or importlib.util.find_spec("caffe2") is not None):
        return
    try:
        import detectron2.export  # noqa: F401

        return
    except ModuleNotFoundError as e:
        if not (e.name or "").startswith("caffe2"):
            return  # something else is missing: leave detectron2's own error for its import
    names = ("caffe2", "caffe2.proto", "caffe2.proto.caffe2_pb2", "caffe2.python",
             "caffe2.python.core", "caffe2.python.utils", "caffe2.python.net_drawer",
             "caffe2.python.workspace", "caffe2.python.onnx", "caffe2.python.onnx.backend")
    added = [n for n in names if n not in sys.modules]
    for n in added:
        sys.modules[n] = _Caffe2Module(n, "d2_norms stand-in: caffe2 is not installed")
    try:
        import detectron2.export as d2_export
        from detectron2.export import api as d2_export_api
    finally:
        for n in added:
            sys.modules.pop(n, None)

    def refuse(name):
        def caffe2_only(*args, **kwargs):
            raise MissingCaffe2Error(f"detectron2.export.{name} needs {_CAFFE2_HINT}")

        caffe2_only.__name__ = caffe2_only.__qualname__ = name
        return caffe2_only

    class Caffe2OnlyClass(type):
        """Stand-in for a caffe2-only class: constructing it or calling any of its class
        attributes (e.g. ``Caffe2Model.load_protobuf``) raises MissingCaffe2Error."""

        def __call__(cls, *args, **kwargs):
            refuse(cls.__name__)()

        def __getattr__(cls, attr):
            return refuse(f"{cls.__name__}.{attr}")

    # The names are rebound to stand-ins that raise when used (detectron2's classes are left
    # as they are).
    for name in ("Caffe2Tracer", "Caffe2Model", "export_caffe2_model", "export_onnx_model"):
        original = getattr(d2_export_api, name, None)
        if original is None:
            continue
        stand_in = (Caffe2OnlyClass(name, (), {"__module__": original.__module__})
                    if isinstance(original, type) else refuse(name))
        setattr(d2_export_api, name, stand_in)
        if hasattr(d2_export, name):
            setattr(d2_export, name, stand_in)
    _APPLIED.append("detectron2.export without caffe2 (TorchScript export works; caffe2-only "
                    "API raises MissingCaffe2Error)")


def apply() -> List[str]:
    """Apply every needed patch once; return the list of what was patched in this process."""
    if not _APPLIED:
        _patch_pillow()
        _patch_numpy_aliases()
        _install_pkg_resources_shim()
        _install_c_extension_placeholder()
        _make_detectron2_export_importable()
        if not _APPLIED:
            _APPLIED.append("nothing (full detectron2 / older libraries)")
    return list(_APPLIED)


def applied() -> List[str]:
    return list(_APPLIED)


# ------------------------------------------------------------------------------------------------
# What d2_norms needs from detectron2
# ------------------------------------------------------------------------------------------------
class UnsupportedDetectron2Error(ImportError):
    """The installed detectron2 lacks an API d2_norms builds on (too old, or changed)."""


#: (module, attribute, what d2_norms uses it for): the public detectron2 API d2_norms builds on,
#: present in v0.6 and in main. Checked once by ``import d2_norms``.
REQUIRED_DETECTRON2_API = (
    ("detectron2.config", "get_cfg", "yacs configs"),
    ("detectron2.config", "LazyConfig", "LazyConfigs"),
    ("detectron2.config", "instantiate", "LazyConfigs"),
    ("detectron2.config", "configurable", "registered components"),
    ("detectron2.layers", "get_norm", "normalizer names in stock components"),
    ("detectron2.layers", "Conv2d", "conv + norm + activation modules"),
    ("detectron2.layers", "ShapeSpec", "backbones and heads"),
    ("detectron2.layers", "FrozenBatchNorm2d", "frozen BN stages"),
    ("detectron2.modeling", "BACKBONE_REGISTRY", "d2_norms backbones"),
    ("detectron2.modeling", "META_ARCH_REGISTRY", "D2NormsRetinaNet"),
    ("detectron2.modeling", "RPN_HEAD_REGISTRY", "D2NormsRPNHead"),
    ("detectron2.modeling", "ROI_BOX_HEAD_REGISTRY", "D2NormsConvFCHead"),
    ("detectron2.modeling", "ROI_MASK_HEAD_REGISTRY", "D2NormsMaskHead"),
    ("detectron2.modeling.backbone.fpn", "FPN", "NormFPN"),
    ("detectron2.modeling.meta_arch.retinanet", "RetinaNet", "D2NormsRetinaNet"),
    ("detectron2.checkpoint", "DetectionCheckpointer", "checkpoints and weight checks"),
    ("detectron2.engine", "DefaultTrainer", "the trainer"),
    ("detectron2.utils.comm", "get_world_size", "multi-process training"),
)


def check_detectron2(required=REQUIRED_DETECTRON2_API) -> None:
    """Raise :class:`UnsupportedDetectron2Error` naming the detectron2 version found and every
    missing API, instead of an AttributeError deep in a build or a forward pass."""
    import importlib

    import detectron2

    missing = []
    for module_name, attribute, used_for in required:
        try:
            module = importlib.import_module(module_name)
        except ImportError as e:
            missing.append(f"{module_name} (cannot import: {e}; used for {used_for})")
            continue
        if not hasattr(module, attribute):
            missing.append(f"{module_name}.{attribute} (used for {used_for})")
    if missing:
        where = os.path.dirname(getattr(detectron2, "__file__", "") or "?")
        raise UnsupportedDetectron2Error(
            f"detectron2 {getattr(detectron2, '__version__', '?')} at {where} lacks what d2_norms "
            f"needs: {'; '.join(missing)}. d2_norms supports detectron2 v0.6 (make setup) and "
            "main built from source (tools/install_detectron2.py --source); see "
            "docs/detectron2_versions.md.")


# ------------------------------------------------------------------------------------------------
# Version-dependent helpers
# ------------------------------------------------------------------------------------------------
def create_local_process_group(num_workers_per_machine: int) -> None:
    """Create detectron2's per-machine process group (``comm.get_local_rank()``,
    ``get_local_size()``) after ``init_process_group``; every rank must call it.

    detectron2 main has a public ``comm.create_local_process_group(num_workers_per_machine)``;
    v0.6 has only the module global ``comm._LOCAL_PROCESS_GROUP`` that its own ``launch`` assigns.
    Both assume machine ``m`` holds ranks ``m * n .. (m + 1) * n - 1`` (what torchrun and
    d2_norms' launch assign)."""
    import torch.distributed as dist
    from detectron2.utils import comm

    create = getattr(comm, "create_local_process_group", None)
    if create is not None:  # detectron2 main (after v0.6)
        create(num_workers_per_machine)
        return
    assert comm._LOCAL_PROCESS_GROUP is None, "the local process group exists already"
    world_size, rank = dist.get_world_size(), dist.get_rank()
    assert world_size % num_workers_per_machine == 0
    for machine in range(world_size // num_workers_per_machine):
        ranks = list(range(machine * num_workers_per_machine,
                           (machine + 1) * num_workers_per_machine))
        group = dist.new_group(ranks)  # every rank creates every group (collective call)
        if rank in ranks:
            comm._LOCAL_PROCESS_GROUP = group
