"""TorchScript export: every d2_norms layer scripts and traces with eager's outputs; RetinaNet and
Mask R-CNN with each normalizer export through detectron2's export API with eager's outputs,
weight standardization folded; tools/export_model.py (default FRN kernels, the check in a fresh
process with torch + torchvision only, the schema file, nothing left behind on failure, bad input
exit 2); the documented loading code; the v0.6 caffe2 shim."""
import hashlib
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
from d2_norms import export_check as C
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
        with pytest.raises(X.ExportError, match="CycleBatchNormList.*method 'trace'"):
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
    d2_export = compat.import_detectron2_export()

    assert d2_export.TracingAdapter is not None and d2_export.scripting_with_instances
    shimmed = any("detectron2.export imported with caffe2 stand-ins" in a
                  for a in compat.applied())
    assert importlib.util.find_spec("caffe2") is None or not shimmed
    assert "caffe2" not in sys.modules or not shimmed  # the stand-ins lived only for the import
    if not shimmed:  # detectron2 main: caffe2 optional, nothing patched
        return
    from detectron2.export import api

    # detectron2's own names, not rebound: its caffe2-only code fails where it reaches caffe2
    for name in ("Caffe2Tracer", "Caffe2Model", "export_caffe2_model"):
        assert getattr(d2_export, name).__module__ == "detectron2.export.api", name
    with pytest.raises(compat.MissingCaffe2Error, match="caffe2_pb2.NetDef needs caffe2.*"
                       "TorchScript"):
        api.Caffe2Model.load_protobuf("nowhere")


# ---------------------------------------------------------------------------- the tool
def _tool(args, timeout=600, default_kernels=False):
    env = dict(os.environ, D2_NORMS_FRN_IMPL="eager", OMP_NUM_THREADS="1")
    if default_kernels:  # as a user runs it: FRN's default choice (auto: compiled where it works)
        del env["D2_NORMS_FRN_IMPL"]
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
    assert sorted(os.listdir(out)) == ["model.schema.json", "model.ts"]  # no temporary file
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


@pytest.mark.parametrize("case", ["corrupt weights", "weights of another model", "not an image",
                                  "negative atol", "output is a file"])
def test_tool_bad_input_exits_2_with_one_message_and_writes_nothing(tmp_path, case):
    out = tmp_path / "out"
    args = ["--config-file", CONFIG, "--output", str(out)]
    if case == "corrupt weights":
        (tmp_path / "w.pth").write_bytes(b"an interrupted copy")
        args += ["--weights", str(tmp_path / "w.pth")]
        message = "cannot be read as a checkpoint"
    elif case == "weights of another model":
        torch.save({"model": {"backbone.other.weight": torch.zeros(3)}}, tmp_path / "w.pth")
        args += ["--weights", str(tmp_path / "w.pth")]
        message = "do not match"
    elif case == "not an image":
        (tmp_path / "image.png").write_text("not an image")
        args += ["--input", str(tmp_path / "image.png")]
        message = f"cannot read --input {tmp_path / 'image.png'} as an image"
    elif case == "negative atol":
        args += ["--atol", "-1"]
        message = "--atol must be a number >= 0, got -1.0"
    else:
        out.write_text("a file")
        message = f"--output {out} exists and is not a directory"
    proc = _tool(args + SMALL, timeout=300)
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-3000:])
    assert message in proc.stderr and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    if case == "output is a file":
        assert out.read_text() == "a file"
    else:
        assert not out.exists()


# ----------------------------------------------- default FRN kernels, the fresh-process check
def test_eager_frn_kernels_selects_the_eager_kernels_and_restores_the_choice():
    for impl in ("auto", "compiled", "eager"):
        L.set_frn_impl(impl)
        with X.eager_frn_kernels():
            assert L.get_frn_impl() == "eager"
        assert L.frn._IMPL == impl
        with pytest.raises(KeyError, match="inside"):
            with X.eager_frn_kernels():
                raise KeyError("inside")
        assert L.frn._IMPL == impl


@pytest.mark.slow
def test_reference_equals_the_export_when_frn_defaults_to_compiled_kernels():
    """Issue 21: the eager reference ran FRN's compiled kernels, the export the eager ones (a
    graph cannot hold compiled kernels): outputs 1e-4 apart. run_eager now runs the eager
    kernels whatever is selected, and leaves the selection as it was. (Slow: compiles.)"""
    from detectron2.modeling import build_model

    if not L.frn_compiled_available():
        pytest.skip("torch.compile is not available here: FRN runs its eager kernels anyway")
    torch.manual_seed(0)
    model = _randomize(build_model(detector_cfg("retinanet", "FRN")), norms_only=True).eval()
    inputs = _inputs(1, size=128)
    exported = X.export_torchscript(X.prepare_for_export(model), inputs, "trace")
    L.set_frn_impl("compiled")  # the autouse fixture restores the eager choice
    with torch.no_grad():
        model(X._image_only(inputs))  # the compiled kernels run (and compile) here
    reference = X.run_eager(model, inputs)
    assert L.frn._IMPL == "compiled"
    diffs = X.compare_outputs(reference, exported(inputs))
    assert max(diffs.values()) == 0, diffs


def test_compare_outputs_counts_nan_and_inf_on_one_side_as_infinite():
    nan, inf = float("nan"), float("inf")
    ref = [{"scores": torch.tensor([0.5, nan, inf])}]
    assert X.compare_outputs(ref, [{"scores": torch.tensor([0.5, nan, inf])}]) == {"scores": 0}
    for other in ([0.5, 0.1, inf], [0.5, nan, 1.0], [nan, nan, inf]):
        diffs = X.compare_outputs(ref, [{"scores": torch.tensor(other)}])
        assert diffs == {"scores": inf}, other


RETINANET_CONFIG = os.path.join("configs", "synthetic", "retinanet_R18_FPN_GN.yaml")


def _small_opts(detector, norm):
    """A 64 px R18-FPN RetinaNet / Mask R-CNN with ``norm`` everywhere, every score kept."""
    opts = ["MODEL.DEVICE", "cpu", "MODEL.RESNETS.NORM", norm, "MODEL.FPN.NORM", norm,
            "MODEL.FPN.OUT_CHANNELS", "64", "INPUT.MIN_SIZE_TEST", "64",
            "INPUT.MAX_SIZE_TEST", "64", "TEST.DETECTIONS_PER_IMAGE", "10"]
    if detector == "retinanet":
        return opts + ["MODEL.RETINANET.NORM", norm, "MODEL.RETINANET.SCORE_THRESH_TEST", "0.0"]
    return opts + ["MODEL.ROI_BOX_HEAD.NORM", norm, "MODEL.ROI_BOX_HEAD.CONV_DIM", "64",
                   "MODEL.ROI_MASK_HEAD.NORM", norm, "MODEL.ROI_MASK_HEAD.CONV_DIM", "64",
                   "MODEL.ROI_HEADS.SCORE_THRESH_TEST", "0.0"]


def _trained_checkpoint(config, opts, directory):
    """A model from ``config`` + ``opts`` with non-trivial norm parameters, saved as a
    checkpoint: (cfg, model, checkpoint path)."""
    from detectron2.checkpoint import DetectionCheckpointer
    from detectron2.modeling import build_model

    from d2_norms.engine.preflight import load_config

    cfg = load_config(config, opts)
    torch.manual_seed(5)
    model = _randomize(build_model(cfg), norms_only=True).eval()
    DetectionCheckpointer(model, save_dir=str(directory)).save("trained")
    return cfg, model, str(directory / "trained.pth")


def _run_documented_code(path, method, image, workdir):
    """docs/export.md's loading code in a new Python process (cwd: an empty directory, so that
    nothing of this repository is importable by accident): its outputs and imported modules."""
    code = ("import sys\npath, device = sys.argv[1], 'cpu'\n" + C.LOAD_CODE
            + "torch.set_num_threads(1)\nimage = torch.load(sys.argv[2])\n"
            + "with torch.no_grad():\n    " + C.CALL_CODE[method] + "\n"
            + "torch.save({'outputs': outputs, 'modules': sorted(sys.modules)}, sys.argv[3])\n")
    workdir.mkdir()
    torch.save(image, workdir / "image.pt")
    proc = subprocess.run([sys.executable, "-c", code, str(path), str(workdir / "image.pt"),
                           str(workdir / "outputs.pt")], cwd=workdir, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = torch.load(workdir / "outputs.pt")
    return result["outputs"], {m.split(".")[0] for m in result["modules"]}


def test_docs_show_the_loading_code_that_the_check_runs():
    with open(os.path.join(REPO, "docs", "export.md")) as f:
        doc = f.read()
    assert C.LOAD_CODE in doc
    for method in X.EXPORT_METHODS:
        assert C.CALL_CODE[method] in doc, method
    assert C.SCHEMA_FILE in doc and C.MODEL_FILE in doc


@pytest.mark.parametrize("detector, norm, method", [("retinanet", "FRN", "trace"),
                                                    ("mask_rcnn", "GNWS", "script"),
                                                    ("retinanet", "NF", "script")])
def test_tool_default_kernels_export_runs_where_deployed(tmp_path, load_tool, detector, norm,
                                                         method):
    """Issue 21 item 3: with FRN's default kernels (no D2_NORMS_FRN_IMPL) the tool's own check
    passes with difference 0; it writes model.ts + model.schema.json and nothing else; the
    documented loading code runs the file in a process with torch + torchvision only and gives
    eager's outputs in the schema's order, dtypes and shapes."""
    config = RETINANET_CONFIG if detector == "retinanet" else CONFIG
    opts = _small_opts(detector, norm)
    cfg, model, weights = _trained_checkpoint(config, opts, tmp_path)
    out = tmp_path / "export"
    proc = _tool(["--config-file", config, "--weights", weights, "--method", method,
                  "--output", str(out), *opts], default_kernels=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "max difference to eager: 0 (10 detections compared" in proc.stdout, proc.stdout
    assert sorted(os.listdir(out)) == ["model.schema.json", "model.ts"]

    schema = json.loads((out / "model.schema.json").read_text())
    assert schema["sha256"] == hashlib.sha256((out / "model.ts").read_bytes()).hexdigest()
    assert (schema["file"], schema["method"]) == ("model.ts", method)
    assert schema["load"] == C.LOAD_CODE + C.CALL_CODE[method] + "\n"
    assert schema["requires"] == ["torch", "torchvision"]
    assert schema["check"]["fresh_process"] and schema["check"]["detections"] == [10]
    assert set(schema["check"]["max_abs_diff"].values()) == {0.0}
    assert schema["input"]["channels"] == cfg.INPUT.FORMAT
    assert schema["input"]["pixel_mean"] == pytest.approx(list(cfg.MODEL.PIXEL_MEAN))
    assert schema["input"]["pixel_std"] == pytest.approx(list(cfg.MODEL.PIXEL_STD))
    assert schema["input"]["resize"]["shortest_edge"] == 64
    assert schema["model"]["folded_convs"] == len(X.standardized_convs(model))
    assert schema["model"]["thing_classes"] == ["circle", "triangle", "square"]
    names = [o["name"] for o in schema["outputs"]]
    fields = ["pred_boxes", "scores", "pred_classes"] + (["pred_masks"] if detector != "retinanet"
                                                         else [])
    # trace: detectron2 flattens the Instances fields in sorted order, then the image size
    assert names == (sorted(fields) if method == "trace" else fields) + ["image_size"]

    inputs = load_tool("export_model").sample_inputs(cfg)
    outputs, modules = _run_documented_code(out / "model.ts", method, inputs[0]["image"],
                                            tmp_path / "deployed")
    assert not modules & {"detectron2", "d2_norms"}, modules
    if method == "trace":
        assert isinstance(outputs, tuple) and len(outputs) == len(names)
        outputs = dict(zip(names, outputs))
    assert sorted(outputs) == sorted(names)
    for spec in schema["outputs"]:
        value = outputs[spec["name"]]
        assert str(value.dtype) == "torch." + spec["dtype"], spec
        assert [d if isinstance(d, int) else value.shape[i] for i, d in enumerate(spec["shape"])
                ] == list(value.shape), spec
        assert list(value.shape) == spec["check_image_shape"]
    assert outputs["image_size"].tolist() == list(inputs[0]["image"].shape[1:])
    diffs = X.compare_outputs(X.run_eager(model, inputs), [outputs])
    assert max(diffs.values()) == 0, diffs


def _raw_detectron2_script(model):
    """detectron2's scripting_with_instances alone: returns its ScriptedInstances class."""
    from detectron2.export import scripting_with_instances

    return scripting_with_instances(X.prepare_for_export(model), X.instance_fields(model))


def test_fresh_process_check_catches_a_file_that_runs_only_where_it_was_made(tmp_path):
    """The error issue 21 reports: detectron2's scripted model hands its ScriptedInstances class
    to Python, which exists only in the process that scripted it. It runs here, fails in a fresh
    process, and write_checked_export keeps nothing (an earlier export stays as it was)."""
    from detectron2.modeling import build_model

    torch.manual_seed(0)
    model = build_model(detector_cfg("retinanet", "GN")).eval()
    inputs = _inputs(1)
    raw = _raw_detectron2_script(model)
    raw(inputs)  # fine in this process
    exported = X.ExportedModel(raw, "script", ["pred_boxes", "scores", "pred_classes"], False)
    reference = X.run_eager(model, inputs)
    new = tmp_path / "new" / "export"
    with pytest.raises(C.ExportCheckError,
                       match=r"(?s)fresh Python process.*ScriptedInstances\d+ is not found"):
        C.write_checked_export(exported, reference, inputs, str(new), {}, atol=1e-4)
    assert not (tmp_path / "new").exists()  # the directories it created are gone

    earlier = tmp_path / "earlier"
    earlier.mkdir()
    (earlier / "model.ts").write_bytes(b"an earlier export")
    (earlier / "model.schema.json").write_text("{}")
    with pytest.raises(C.ExportCheckError, match="ScriptedInstances"):
        C.write_checked_export(exported, reference, inputs, str(earlier), {}, atol=1e-4)
    assert sorted(os.listdir(earlier)) == ["model.schema.json", "model.ts"]
    assert (earlier / "model.ts").read_bytes() == b"an earlier export"
    assert (earlier / "model.schema.json").read_text() == "{}"


def _op_of_this_process():
    """A custom op registered in this process only (as a plugin's op would be)."""
    try:
        return torch.ops.d2n_export_test.double
    except (AttributeError, RuntimeError):
        pass

    @torch.library.custom_op("d2n_export_test::double", mutates_args=())
    def double(x: torch.Tensor) -> torch.Tensor:
        return x * 2

    return torch.ops.d2n_export_test.double


class _Doubler(nn.Module):
    def forward(self, x):
        return (_op_of_this_process()(x),)


def test_fresh_process_check_catches_files_that_do_not_load_there(tmp_path):
    image = torch.rand(3, 8, 8)
    traced = torch.jit.trace(_Doubler(), (image,))
    assert torch.equal(_reload(traced)(image)[0], image * 2)  # loads and runs in this process
    torch.jit.save(traced, str(tmp_path / "op.ts"))
    with pytest.raises(C.ExportCheckError, match=r"(?s)fresh Python process.*d2n_export_test"):
        C.run_in_fresh_process(str(tmp_path / "op.ts"), "trace", [image])
    (tmp_path / "cut.ts").write_bytes((tmp_path / "op.ts").read_bytes()[:100])  # truncated
    with pytest.raises(C.ExportCheckError, match="fresh Python process"):
        C.run_in_fresh_process(str(tmp_path / "cut.ts"), "trace", [image])


def test_write_checked_export_keeps_nothing_when_outputs_differ(tmp_path):
    from detectron2.modeling import build_model

    torch.manual_seed(0)
    model = _randomize(build_model(detector_cfg("retinanet", "GN")), norms_only=True).eval()
    inputs = _inputs(1)
    exported = X.export_torchscript(X.prepare_for_export(model), inputs, "trace")
    out = tmp_path / "out"
    other_image = X.run_eager(model, _inputs(2))  # a reference the file does not reproduce
    with pytest.raises(C.ExportCheckError, match="differ from eager"):
        C.write_checked_export(exported, other_image, inputs, str(out), {}, atol=1e-4)
    assert not out.exists()
    # the right reference passes even at atol 0, and the file lands with its schema only
    schema = C.write_checked_export(exported, X.run_eager(model, inputs), inputs, str(out),
                                    {"model": {"note": "kept"}}, atol=0.0)
    assert sorted(os.listdir(out)) == ["model.schema.json", "model.ts"]
    assert json.loads((out / "model.schema.json").read_text()) == schema
    assert schema["model"] == {"note": "kept"} and schema["check"]["atol"] == 0.0
    assert schema["input"]["traced_image_shape"] == [3, 64, 64]
