"""TorchScript export: every d2_norms layer scripts and traces with eager's outputs; RetinaNet and
Mask R-CNN with each normalizer export through detectron2's export API with eager's outputs,
weight standardization folded; tools/export_model.py; the v0.6 caffe2 shim."""
import importlib.util
import io
import json
import os
import subprocess
import sys

import pytest
import torch
from torch import nn

import d2_norms
import d2_norms.layers as L
from d2_norms import compat
from d2_norms import export as X
from d2_norms.modeling import NFBasicBlock, NFBottleneckBlock, NormBasicBlock, NormBottleneckBlock

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NORMS = ("BN", "GN", "GNWS", "FRN", "NF")


@pytest.fixture(autouse=True)
def _one_thread_eager_frn():
    threads, impl = torch.get_num_threads(), L.frn._IMPL
    torch.set_num_threads(1)
    L.set_frn_impl("eager")
    yield
    L.set_frn_impl(impl)
    torch.set_num_threads(threads)


def _reload(module):
    buffer = io.BytesIO()
    torch.jit.save(module, buffer)  # fails on Python ops (e.g. an autograd.Function in a trace)
    buffer.seek(0)
    return torch.jit.load(buffer)


_NORM_TYPES = (L.FilterResponseNorm2d, L.TLU, nn.GroupNorm, nn.modules.batchnorm._NormBase)


def _randomize(module, norms_only=False):
    """Non-trivial parameters (gamma, beta, tau, gains), as after training. ``norms_only``:
    only those of norm layers and Scaled WS gains (a detector's box deltas stay sane)."""
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, m in module.named_modules():
            if norms_only and not isinstance(m, _NORM_TYPES + (L.ScaledStdConv2d,)):
                continue
            for pname, p in m.named_parameters(recurse=False):
                if norms_only and isinstance(m, L.ScaledStdConv2d) and pname != "gain":
                    continue
                p.copy_(p + 0.3 * torch.randn(p.shape, generator=g))
            for bname, b in m.named_buffers(recurse=False):
                if norms_only and bname == "running_var":
                    b.copy_(b * (1 + 0.5 * torch.rand(b.shape, generator=g)))
    return module


LAYERS = {
    "FRN+TLU": lambda: L.FilterResponseNorm2d(16),
    "FRN": lambda: L.FilterResponseNorm2d(16, tlu=False),
    "FRN_LEPS": lambda: L.FilterResponseNorm2d(16, learned_eps=True),
    "TLU": lambda: L.TLU(16),
    "GN": lambda: L.GroupNorm(16, 4),
    "GN_C4": lambda: L.GroupNorm(16, channels_per_group=4),
    "WSConv2d": lambda: L.WSConv2d(16, 16, 3),
    "ScaledStdConv2d": lambda: L.ScaledStdConv2d(16, 16, 3, gamma="relu"),
    "conv GNWS+ReLU": lambda: L.conv_norm_act(16, 32, 3, norm="GNWS", activation_in_norm=True),
    "conv FRN+TLU": lambda: L.conv_norm_act(16, 16, 3, norm="FRN"),
    "conv NF": lambda: L.conv_norm_act(16, 16, 3, norm="NF"),
    "NF basic block": lambda: NFBasicBlock(16, 32, stride=2, beta=1.1, skip_gain_init=0.5),
    "NF bottleneck": lambda: NFBottleneckBlock(16, 16, bottleneck_channels=8, beta=1.2,
                                               skip_gain_init=0.5),
    "FRN basic block": lambda: NormBasicBlock(16, 16, norm="FRN"),
    "GNWS bottleneck": lambda: NormBottleneckBlock(16, 64, bottleneck_channels=32, norm="GNWS"),
}


@pytest.mark.parametrize("method", ["script", "trace"])
@pytest.mark.parametrize("name", list(LAYERS))
def test_layer_exports_with_eager_outputs(name, method):
    torch.manual_seed(0)
    layer = _randomize(LAYERS[name]()).eval()
    x = torch.randn(3, 16, 9, 7)
    with torch.no_grad():
        exported = torch.jit.script(layer) if method == "script" else torch.jit.trace(layer, (x,))
        exported = _reload(exported)
        # another batch and spatial size than the trace's (ROI heads change N every image)
        for inp in (x, torch.randn(5, 16, 6, 10)):
            torch.testing.assert_close(exported(inp), layer(inp), rtol=0, atol=1e-6)


def test_frn_export_handles_empty_and_single_row_batches():
    frn = _randomize(L.FilterResponseNorm2d(4)).eval()
    scripted = _reload(torch.jit.script(frn))
    with torch.no_grad():
        assert scripted(torch.randn(0, 4, 5, 5)).shape == (0, 4, 5, 5)
        one = L.FilterResponseNorm2d(1).eval()
        x = torch.randn(1, 1, 5, 5)
        # eager uses frn_reference for N*C == 1, the export the row kernel: same math
        torch.testing.assert_close(torch.jit.script(one)(x), one(x), rtol=1e-6, atol=1e-6)


def test_scripted_layers_keep_the_clear_width_errors():
    for layer in (L.FilterResponseNorm2d(8), L.GroupNorm(8, 4)):
        scripted = torch.jit.script(layer.eval())
        with pytest.raises(Exception, match=r"8 channels|\(8\)"):
            scripted(torch.randn(2, 6, 4, 4))


def test_training_paths_unchanged_after_export():
    """Scripting/tracing a layer leaves the eager layer on its fused training op."""
    conv = L.WSConv2d(8, 8, 3).train()
    torch.jit.script(conv)
    x = torch.randn(2, 8, 6, 6, requires_grad=True)
    out = conv(x)
    assert "WSConvFunction" in type(out.grad_fn).__name__


def test_fold_removes_standardization_and_sharing_hooks():
    from detectron2.layers import Conv2d

    head = nn.Sequential(L.conv_norm_act(8, 32, 3, norm="GNWS", activation_in_norm=True),
                         L.conv_norm_act(32, 8, 3, norm="NF", apply_act=False))
    L.share_standardized_weights(head)
    x = torch.randn(2, 8, 6, 6)
    with torch.no_grad():
        expected = head.eval()(x)
    folded = X.prepare_for_export(head)
    assert X.standardized_convs(head) and not X.standardized_convs(folded)
    assert all(type(m) is Conv2d for m in folded)
    assert not folded._forward_hooks and not folded._forward_pre_hooks
    scripted = _reload(torch.jit.script(folded))
    assert [m.original_name for m in scripted.children()] == ["Conv2d", "Conv2d"]
    torch.testing.assert_close(scripted(x), expected, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------- models
def detector_cfg(detector, norm):
    """A small RetinaNet / Mask R-CNN (R18-FPN, 64 px) with ``norm`` everywhere, as the
    COCO-scratch configs set it (backbone, FPN, heads); every score kept so outputs exist."""
    from detectron2.config import get_cfg

    cfg = get_cfg()
    d2_norms.add_d2_norms_config(cfg)
    if detector == "retinanet":
        cfg.merge_from_file(os.path.join(REPO, "configs", "Base-RetinaNet.yaml"))
        cfg.MODEL.BACKBONE.NAME = "build_d2n_retinanet_resnet_fpn_backbone"
        cfg.MODEL.META_ARCHITECTURE = "D2NormsRetinaNet"
        cfg.MODEL.RETINANET.merge_from_list(["NUM_CLASSES", 3, "NUM_CONVS", 2, "NORM", norm,
                                             "SCORE_THRESH_TEST", 0.0,
                                             "TOPK_CANDIDATES_TEST", 50])
    else:
        cfg.merge_from_file(os.path.join(REPO, "configs", "synthetic",
                                         "mask_rcnn_R18_FPN_GN.yaml"))
        cfg.MODEL.ROI_BOX_HEAD.merge_from_list(["NORM", norm, "CONV_DIM", 64, "NUM_CONV", 2,
                                                "FC_DIM", 64])
        cfg.MODEL.ROI_MASK_HEAD.merge_from_list(["NORM", norm, "CONV_DIM", 64, "NUM_CONV", 1])
        cfg.MODEL.ROI_HEADS.SCORE_THRESH_TEST = 0.0
        cfg.MODEL.RPN.POST_NMS_TOPK_TEST = 50
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.RESNETS.merge_from_list(["DEPTH", 18, "RES2_OUT_CHANNELS", 64, "NORM", norm])
    cfg.MODEL.FPN.merge_from_list(["NORM", norm, "OUT_CHANNELS", 64])
    cfg.TEST.DETECTIONS_PER_IMAGE = 20
    return cfg


def _inputs(seed, size=64):
    g = torch.Generator().manual_seed(seed)
    return [{"image": torch.randint(0, 256, (3, size, size), generator=g).float()}]


def _scripting_unsupported_by_detectron2(detector, norm):
    # detectron2's RetinaNetHead gives BN / SyncBN one norm per level (CycleBatchNormList,
    # indexed by a counter): not scriptable in detectron2 itself, with or without d2_norms.
    return detector == "retinanet" and norm in ("BN", "SyncBN")


@pytest.mark.parametrize("method", ["trace", "script"])
@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("detector", ["retinanet", "mask_rcnn"])
def test_detector_exports_with_eager_outputs(detector, norm, method):
    from detectron2.modeling import build_model

    torch.manual_seed(0)
    model = _randomize(build_model(detector_cfg(detector, norm)), norms_only=True).eval()
    inputs = _inputs(1)
    eager = X.run_eager(model, inputs)
    assert eager[0]["scores"].numel() > 0
    folded = X.prepare_for_export(model)
    if norm in ("GNWS", "NF"):
        assert len(X.standardized_convs(model)) > 10  # backbone, FPN and heads
    if method == "script" and _scripting_unsupported_by_detectron2(detector, norm):
        with pytest.raises(Exception, match="ModuleList|Sequential|index"):
            X.export_torchscript(folded, inputs, method)
        return
    exported = X.export_torchscript(folded, inputs, method)
    reloaded = exported.with_module(_reload(exported.module))
    for check_inputs in (inputs, _inputs(2)):  # the traced image and another one
        expected = X.run_eager(model, check_inputs)
        diffs = X.compare_outputs(expected, reloaded(check_inputs))
        assert max(diffs.values()) <= 1e-4, diffs
    # the exported graph holds plain convs only: no standardization left
    types = {getattr(m, "original_name", type(m).__name__) for m in reloaded.module.modules()}
    assert "Conv2d" in types
    assert not types & {"WSConv2d", "ScaledStdConv2d"}, types
    if norm == "FRN":
        assert "FilterResponseNorm2d" in types


def test_export_refuses_unfolded_and_training_models():
    from detectron2.modeling import build_model

    model = build_model(detector_cfg("mask_rcnn", "GNWS"))
    with pytest.raises(X.ExportError, match="eval-mode"):
        X.export_torchscript(model.train(), _inputs(1))
    with pytest.raises(X.ExportError, match="prepare_for_export"):
        X.export_torchscript(model.eval(), _inputs(1))
    with pytest.raises(X.ExportError, match="'onnx' is not supported"):
        X.export_torchscript(X.prepare_for_export(model), _inputs(1), "onnx")


# ---------------------------------------------------------------------------- caffe2 shim
def test_detectron2_export_imports_and_caffe2_only_api_says_why():
    import detectron2.export as d2_export

    assert d2_export.TracingAdapter is not None and d2_export.scripting_with_instances
    shimmed = any("detectron2.export without caffe2" in a for a in compat.applied())
    assert importlib.util.find_spec("caffe2") is None or not shimmed
    assert "caffe2" not in sys.modules or not shimmed  # the stand-ins lived only for the import
    if not shimmed:  # detectron2 main: caffe2 optional, nothing patched
        assert not hasattr(d2_export, "Caffe2Tracer") or importlib.util.find_spec("caffe2")
        return
    with pytest.raises(compat.MissingCaffe2Error, match="Caffe2Tracer needs caffe2.*TorchScript"):
        d2_export.Caffe2Tracer(None, None, None)
    with pytest.raises(compat.MissingCaffe2Error, match="needs caffe2"):
        d2_export.Caffe2Model.load_protobuf("nowhere")
    with pytest.raises(compat.MissingCaffe2Error, match="export_caffe2_model needs caffe2"):
        d2_export.export_caffe2_model(None, None, None)


# ---------------------------------------------------------------------------- the tool
def _tool(args, timeout=600):
    env = dict(os.environ, D2_NORMS_FRN_IMPL="eager", OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, os.path.join(REPO, "tools", "export_model.py"), *args],
                          capture_output=True, text=True, timeout=timeout, env=env, cwd=REPO)


SMALL = ["MODEL.DEVICE", "cpu", "MODEL.RESNETS.NORM", "GNWS", "MODEL.FPN.NORM", "GNWS",
         "MODEL.FPN.OUT_CHANNELS", "64", "MODEL.ROI_BOX_HEAD.NORM", "GNWS",
         "MODEL.ROI_BOX_HEAD.CONV_DIM", "64", "MODEL.ROI_MASK_HEAD.NORM", "GNWS",
         "MODEL.ROI_MASK_HEAD.CONV_DIM", "64", "INPUT.MIN_SIZE_TEST", "64",
         "INPUT.MAX_SIZE_TEST", "64", "TEST.DETECTIONS_PER_IMAGE", "10",
         "MODEL.ROI_HEADS.SCORE_THRESH_TEST", "0.0"]
CONFIG = os.path.join("configs", "synthetic", "mask_rcnn_R18_FPN_GN.yaml")


def test_tool_exports_a_checkpoint_and_checks_it(tmp_path):
    from detectron2.checkpoint import DetectionCheckpointer
    from detectron2.modeling import build_model

    from d2_norms.engine.preflight import load_config

    cfg = load_config(CONFIG, SMALL)
    torch.manual_seed(5)
    model = _randomize(build_model(cfg), norms_only=True)
    DetectionCheckpointer(model, save_dir=str(tmp_path)).save("trained")
    out = tmp_path / "export"
    proc = _tool(["--config-file", CONFIG, "--weights", str(tmp_path / "trained.pth"),
                  "--format", "torchscript", "--method", "trace", "--output", str(out), *SMALL])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "max difference to eager: 0" in proc.stdout
    info = json.loads(proc.stdout[:proc.stdout.rindex("}") + 1])
    assert info["folded_convs"] == len(X.standardized_convs(model)) > 10
    assert info["detections"] == 10 and max(info["max_abs_diff"].values()) <= 1e-4
    assert sorted(os.listdir(out)) == ["model.ts"]  # no temporary file left
    ts = torch.jit.load(str(out / "model.ts"))
    # the file holds the trained weights: its first conv is the folded first WS conv
    first = ts.model.backbone.bottom_up.stem.conv1
    torch.testing.assert_close(first.weight,
                               model.backbone.bottom_up.stem.conv1.standardized_weight().detach())


@pytest.mark.parametrize("args, message", [
    (["--method", "onnx"], "--method 'onnx' is not supported; use one of trace, script"),
    (["--format", "caffe2"], "--format 'caffe2' is not supported"),
    (["--weights", "missing.pth"], "--weights missing.pth does not exist"),
    (["--config-file", "nope.yaml"], "nope.yaml does not exist"),
])
def test_tool_bad_input_exits_2(tmp_path, args, message):
    base = {"--config-file": CONFIG, "--output": str(tmp_path / "out")}
    for flag, value in zip(args[::2], args[1::2]):
        base[flag] = value
    argv = [x for kv in base.items() for x in kv] + SMALL
    proc = _tool(argv, timeout=300)
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    assert message in proc.stderr
    assert not (tmp_path / "out").exists()
