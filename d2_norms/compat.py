"""Everything that differs between detectron2 versions (v0.6 and main) and library versions.

The one place where d2_norms knows about versions; the rest of the package uses public
detectron2 API only. Two kinds of entries:

* Shims, applied once by ``import d2_norms`` (:func:`apply`), only for what the installed
  detectron2 cannot import or run without, each checking first whether it is needed (on
  detectron2 main, built or pure Python, most do nothing). They never rebind a name of
  detectron2 and never leave a stand-in module behind: where detectron2 has its own fallback
  (``try: from detectron2 import _C`` / ``except ImportError``: pycocotools instead of the
  compiled COCOeval, dummy deformable convs), that fallback still runs after ``import d2_norms``.

  - v0.6 pure Python: ``detectron2.layers`` imports ``_C`` at module top with no fallback.
    It is imported once with a placeholder ``detectron2._C`` present only during that import
    (its ops raise :class:`MissingCompiledOpError` naming the op when called); afterwards
    ``detectron2._C`` is again not importable, so ``fast_eval_api`` fails to import and
    ``COCOEvaluator`` uses pycocotools, as detectron2 intends.
  - v0.6 ``detectron2.data.transforms`` reads ``PIL.Image.LINEAR`` (removed in Pillow 10) when
    it is imported: the alias exists only during that import.
  - ``detectron2.model_zoo`` imports ``pkg_resources`` (gone from setuptools 81): imported
    once with a stand-in present only during that import.
  - v0.6 ``detectron2.export`` imports caffe2 at module top: :func:`import_detectron2_export`
    (called by d2_norms' export code, not on import) imports it once with stand-in caffe2
    modules present only during that import; its caffe2-only API raises
    :class:`MissingCaffe2Error` when it reaches caffe2 (TorchScript export works).
  - numpy aliases removed in numpy 1.24 (``np.int`` ...) that the installed detectron2's own
    source uses at run time (v0.6: the training loader's class histogram, sem-seg eval): the
    only shim that stays, since detectron2 reads them when it runs; only the names its source
    uses are added, and none on main.

  ``applied()`` lists what was done in this process.
* Version-dependent helpers called by d2_norms' code: :func:`create_local_process_group`
  (v0.6 has only the module global ``comm._LOCAL_PROCESS_GROUP``; main has a public function).

Other version differences are handled without branching: ``NormFPN`` sets every attribute
detectron2's ``FPN.__init__`` sets on either version (main's ``square_pad``), checkpoints are read
through ``DetectionCheckpointer.load`` (main guards the private ``_load_file``), the names
detectron2's ``get_norm`` accepts are probed (main adds ``LN``). docs/detectron2_versions.md
lists them.
"""
import contextlib
import importlib
import importlib.util
import os
import re
import sys
import types
from typing import Dict, Iterator, List

_APPLIED: List[str] = []
_DONE: List[bool] = []

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
        raise AttributeError(f"module 'detectron2._C' (placeholder) has no attribute '{name}'")

    def __dir__(self):
        return sorted(set(super().__dir__()) | set(COMPILED_OPS))



@contextlib.contextmanager
def _modules_present(modules: Dict[str, types.ModuleType]) -> Iterator[None]:
    """``modules`` in ``sys.modules`` (and as attributes of their loaded parent packages) for the
    duration of the block only; names that were present already are left alone."""
    added = [name for name in modules if name not in sys.modules]
    attributes = []
    for name in added:
        sys.modules[name] = modules[name]
        parent, _, child = name.rpartition(".")
        if parent in sys.modules and not hasattr(sys.modules[parent], child):
            setattr(sys.modules[parent], child, modules[name])
            attributes.append((sys.modules[parent], child))
    try:
        yield
    finally:
        for name in added:
            sys.modules.pop(name, None)
        for package, child in attributes:
            if getattr(package, child, None) is not None:
                delattr(package, child)


def _spec_exists(name: str) -> bool:
    """Whether ``name`` can be found (a finder that refuses it counts as absent)."""
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def _detectron2_installed() -> bool:
    return _spec_exists("detectron2")


def _import_failure(module: str):
    """The error importing ``module`` raises (ImportError, or the AttributeError of a removed
    library name read at import time), or None when it imports."""
    before = set(sys.modules)
    try:
        importlib.import_module(module)
    except (ImportError, AttributeError) as e:
        # detectron2's modules this attempt loaded go too: a retry must load them again, or
        # the re-created package would lack them as attributes (detectron2.layers.batch_norm).
        # (Other libraries' modules loaded on the way are complete and stay.)
        for name in set(sys.modules) - before:
            if name == "detectron2" or name.startswith("detectron2."):
                sys.modules.pop(name, None)
        return e
    return None


def _import_layers_without_compiled_ops() -> None:
    """v0.6's ``detectron2.layers`` does ``from detectron2 import _C`` at module top (deformable
    and rotated ops) with no fallback: without the C++ extension detectron2 does not import.
    Import it with a placeholder that exists only during the import."""
    if not _detectron2_installed() or _spec_exists("detectron2._C"):
        return  # real compiled extension
    error = _import_failure("detectron2.layers")
    if error is None:
        return  # main: its own try/except fallbacks handle the missing extension
    if "_C" not in str(error):
        return  # something else is missing: leave detectron2's own error for its import
    placeholder = _MissingExtension("detectron2._C", __doc__)
    placeholder.__file__ = None
    with _modules_present({"detectron2._C": placeholder}):
        importlib.import_module("detectron2.layers")
    _APPLIED.append("detectron2.layers imported with a detectron2._C placeholder present during "
                    "that import only (v0.6 without compiled ops; detectron2's own fallbacks "
                    "still see no _C)")


def _import_evaluation_with_official_cocoeval() -> None:
    """v0.6's ``coco_evaluation`` imports ``COCOeval_opt`` from ``fast_eval_api`` (which needs
    ``_C``) with no fallback, so ``detectron2.evaluation`` and ``detectron2.engine`` do not
    import without the extension. detectron2 main falls back to pycocotools' ``COCOeval``
    (``except ImportError: COCOeval_opt = COCOeval``); v0.6 gets that same fallback: during the
    import of ``detectron2.evaluation`` only, ``fast_eval_api`` is a module whose
    ``COCOeval_opt`` is pycocotools' ``COCOeval``, so stock ``COCOEvaluator`` evaluates with
    the official implementation (``use_fast_impl`` or not)."""
    if not _detectron2_installed() or "detectron2.evaluation" in sys.modules:
        return
    error = _import_failure("detectron2.evaluation")
    if error is None or "_C" not in str(error):
        return
    from pycocotools.cocoeval import COCOeval

    name = "detectron2.evaluation.fast_eval_api"
    fallback = types.ModuleType(name, "d2_norms: detectron2 main's fallback when _C is missing")
    fallback.COCOeval_opt = COCOeval
    with _modules_present({name: fallback}):
        evaluation = importlib.import_module("detectron2.evaluation")
    if getattr(evaluation, "fast_eval_api", None) is fallback:
        delattr(evaluation, "fast_eval_api")
    _APPLIED.append("detectron2.evaluation imported with COCOeval_opt = pycocotools' COCOeval "
                    "(detectron2 main's fallback without compiled ops)")


def _import_transforms_with_pillow_linear() -> None:
    """v0.6's ``ExtentTransform`` has ``interp=Image.LINEAR`` as a default argument, read when
    ``detectron2.data.transforms`` is imported; Pillow 10 removed that alias of BILINEAR."""
    if not _detectron2_installed() or "detectron2.data.transforms" in sys.modules:
        return
    from PIL import Image

    if hasattr(Image, "LINEAR"):
        return
    error = _import_failure("detectron2.data.transforms")
    if error is None or "LINEAR" not in str(error):
        return
    Image.LINEAR = Image.BILINEAR
    try:
        importlib.import_module("detectron2.data.transforms")
    finally:
        del Image.LINEAR
    _APPLIED.append("detectron2.data.transforms imported with PIL.Image.LINEAR = BILINEAR "
                    "during that import only")


def _pkg_resources_stand_in() -> types.ModuleType:
    """The subset of pkg_resources that detectron2.model_zoo uses (``resource_filename``)."""
    import importlib.metadata
    import importlib.resources

    shim = types.ModuleType("pkg_resources")
    shim.__doc__ = "d2_norms stand-in: the pkg_resources functions detectron2.model_zoo calls."

    def resource_filename(package: str, resource: str) -> str:
        return os.fspath(importlib.resources.files(package).joinpath(resource))

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
    return shim


def _import_model_zoo_without_pkg_resources() -> None:
    """``detectron2.model_zoo`` imports pkg_resources (removed from setuptools 81) for one call.
    The module keeps its reference to the stand-in; ``import pkg_resources`` elsewhere still
    fails as it does without d2_norms."""
    if not _detectron2_installed() or "detectron2.model_zoo" in sys.modules:
        return
    if _spec_exists("pkg_resources"):
        return
    error = _import_failure("detectron2.model_zoo")
    if error is None or getattr(error, "name", "") != "pkg_resources":
        return
    with _modules_present({"pkg_resources": _pkg_resources_stand_in()}):
        importlib.import_module("detectron2.model_zoo")
    _APPLIED.append("detectron2.model_zoo imported with a pkg_resources stand-in present during "
                    "that import only")


_NUMPY_ALIASES = {"bool": bool, "int": int, "float": float, "object": object, "str": str}


def _numpy_aliases_detectron2_uses() -> List[str]:
    """The removed numpy aliases (``np.int`` ...) the installed detectron2's source uses."""
    spec = importlib.util.find_spec("detectron2")
    if spec is None or not spec.submodule_search_locations:
        return []
    pattern = re.compile(r"\bnp\.(" + "|".join(_NUMPY_ALIASES) + r")\b(?!_)")
    used = set()
    for root in spec.submodule_search_locations:
        for folder, _, files in os.walk(root):
            for name in files:
                if name.endswith(".py"):
                    try:
                        with open(os.path.join(folder, name), encoding="utf-8") as f:
                            used.update(pattern.findall(f.read()))
                    except (OSError, UnicodeDecodeError):
                        continue
    return sorted(used)


def _add_numpy_aliases() -> None:
    """numpy 1.24 removed np.bool/np.int/np.float/...; detectron2 v0.6 calls them at run time
    (``BitMasks``, the training loader's class histogram, sem-seg evaluation)."""
    import numpy as np

    missing = [name for name in _NUMPY_ALIASES if name not in np.__dict__]
    if not missing:
        return
    for name in _numpy_aliases_detectron2_uses():
        if name in missing:
            setattr(np, name, _NUMPY_ALIASES[name])
            _APPLIED.append(f"numpy.{name} = {_NUMPY_ALIASES[name].__name__} (used by the "
                            "installed detectron2)")


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


def import_detectron2_export():
    """``detectron2.export``, importable on v0.6 too (returns the module).

    Called by d2_norms' export code when it needs it, not by ``import d2_norms``: importing
    ``detectron2.export`` has side effects of detectron2's own (on main it changes what
    ``torch.jit.script`` accepts in stock models), which a plain import must not bring.

    detectron2 v0.6's ``detectron2.export`` imports caffe2 at module top (torch 2.x has none),
    so ``TracingAdapter`` / ``scripting_with_instances`` were unreachable. Import it once with
    stand-in caffe2 modules that exist only during that import (``import caffe2`` still fails
    afterwards). The caffe2-only API (Caffe2Tracer, Caffe2Model, ...) stays detectron2's own; it
    raises :class:`MissingCaffe2Error` when it reaches a caffe2 call. Nothing happens where
    ``detectron2.export`` imports as it is (detectron2 main: caffe2 optional) or caffe2 exists.
    """
    if ("detectron2.export" in sys.modules or not _detectron2_installed()
            or _spec_exists("caffe2")):
        return importlib.import_module("detectron2.export")
    error = _import_failure("detectron2.export")
    if error is None or not (getattr(error, "name", "") or "").startswith("caffe2"):
        # imports, or something else is missing: detectron2's own error
        return importlib.import_module("detectron2.export")
    names = ("caffe2", "caffe2.proto", "caffe2.proto.caffe2_pb2", "caffe2.python",
             "caffe2.python.core", "caffe2.python.utils", "caffe2.python.net_drawer",
             "caffe2.python.workspace", "caffe2.python.onnx", "caffe2.python.onnx.backend")
    stand_ins = {n: _Caffe2Module(n, "d2_norms stand-in: caffe2 is not installed") for n in names}
    with _modules_present(stand_ins):
        module = importlib.import_module("detectron2.export")
    _APPLIED.append("detectron2.export imported with caffe2 stand-ins present during that import "
                    "only (TorchScript export works; caffe2-only API raises MissingCaffe2Error)")
    return module


def apply() -> List[str]:
    """Apply every needed shim once; return the list of what was done in this process."""
    if not _DONE:
        _DONE.append(True)
        _add_numpy_aliases()
        _import_layers_without_compiled_ops()
        _import_transforms_with_pillow_linear()
        _import_evaluation_with_official_cocoeval()
        _import_model_zoo_without_pkg_resources()
    return list(_APPLIED)


def applied() -> List[str]:
    """What :func:`apply` did in this process (empty: nothing was needed)."""
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
