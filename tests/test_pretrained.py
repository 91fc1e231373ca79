"""Pretrained backbones from timm (tools/convert_pretrained.py, d2_norms/modeling/pretrained.py).

The reference is timm itself: its models are built with ``pretrained=False`` and every
parameter randomised (gains and the zero-initialised last gains included, so no branch is
zero); the converted d2_norms backbone must give res2..res5 equal to timm's stage outputs.
Tolerances: in float64 the two networks differ only by rounding (timm multiplies by 1/sqrt(var)
where d2_norms divides by sqrt(var), standardizes weights with batch_norm instead of its own
kernel, and the converted gains are rescaled by gamma_timm/gamma_d2n): <= 1e-12 relative. In
float32 the same op sequence rounds at ~6e-8 per op and the error grows over ~50 layers:
measured <= 2e-6 of the largest activation; 1e-4 leaves margin and still fails by a factor
>= 10 on any real difference (a wrong epsilon or shortcut: >= 1e-3, tested below).

Tests that need timm skip without it (the detectron2-main venv has none); the Caffe2-format and
bad-input tests that can run without timm do.
"""
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest
import torch

from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import get_cfg
from detectron2.data import detection_utils
from detectron2.layers import ShapeSpec
from detectron2.modeling import build_model

from d2_norms.config import add_d2_norms_config
from d2_norms.modeling import pretrained as P
from d2_norms.modeling.backbone import build_d2n_resnet_backbone

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOL = os.path.join(REPO, "tools", "convert_pretrained.py")
TRAIN_NET = os.path.join(REPO, "tools", "train_net.py")
FINETUNE = os.path.join(REPO, "configs", "COCO-finetune")
STAGES = ("res2", "res3", "res4", "res5")
MODELS = ("resnet50_gn", "nf_resnet50")
RTOL32, RTOL64 = 1e-4, 1e-12

try:
    import timm
except ImportError:  # the detectron2-main venv has no timm
    timm = None
needs_timm = pytest.mark.skipif(timm is None, reason="timm is not installed in this venv "
                                "(the reference network of these tests)")


def randomized_timm(name, seed=0):
    """timm's model with every parameter random: convs ~ He normal, norm/Scaled-WS gains in
    [0.5, 1.5] (timm zero-initialises the last gain of each NF block), biases ~ N(0, 0.1)."""
    model = timm.create_model(name, pretrained=False).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for key, p in model.named_parameters():
            if p.dim() >= 2 and not key.endswith("gain"):
                p.copy_(torch.randn(p.shape, generator=gen) * (2.0 / p[0].numel()) ** 0.5)
            elif key.endswith(("gain", "weight")):
                p.copy_(torch.rand(p.shape, generator=gen) + 0.5)
            else:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    return model


def timm_stage_outputs(model, name, x):
    """timm's own stage outputs (layer1..4 / stages.0..3), read with forward hooks."""
    modules = {"resnet50_gn": ("layer1", "layer2", "layer3", "layer4"),
               "nf_resnet50": ("stages.0", "stages.1", "stages.2", "stages.3")}[name]
    outputs, handles = {}, []
    for stage, module in zip(STAGES, modules):
        handles.append(model.get_submodule(module).register_forward_hook(
            lambda m, a, out, stage=stage: outputs.__setitem__(stage, out)))
    with torch.no_grad():
        model(x)
    for h in handles:
        h.remove()
    return outputs


def relative_errors(features, reference):
    return {k: float((features[k] - reference[k]).abs().max() / reference[k].abs().max())
            for k in STAGES}


def run_tool(*args):
    """tools/convert_pretrained.py as a command (a new process, as users run it)."""
    return subprocess.run([sys.executable, TOOL, *args], capture_output=True, text=True,
                          cwd=REPO, timeout=600)


@pytest.fixture
def tool(capsys, load_tool):
    """The same tool's ``main`` in this process (the bad-input tests: no ~15 s start-up each);
    returns an object with ``returncode``, ``stdout``, ``stderr`` like ``run_tool``."""
    import types

    module = load_tool("convert_pretrained")

    def run(*args):
        code = module.main(list(args))
        captured = capsys.readouterr()
        return types.SimpleNamespace(returncode=code, stdout=captured.out, stderr=captured.err)
    return run


def finetune_cfg(config_file, *opts):
    cfg = add_d2_norms_config(get_cfg())
    cfg.merge_from_file(config_file)
    cfg.merge_from_list(list(opts))
    cfg.MODEL.DEVICE = "cpu"
    return cfg


@pytest.fixture(scope="module", params=MODELS)
def converted(request, tmp_path_factory):
    """(name, randomised timm model, path of the file tools/convert_pretrained.py wrote)."""
    if timm is None:
        pytest.skip("timm is not installed in this venv")
    name = request.param
    model = randomized_timm(name)
    tmp = tmp_path_factory.mktemp(name)
    src, out = str(tmp / "timm.pth"), str(tmp / "converted.pth")
    torch.save(model.state_dict(), src)
    result = run_tool("timm", name, "--checkpoint", src, "-o", out, "--verify")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "verify (max |d2_norms - timm| / max |timm|, float32): res2 " in result.stdout
    assert "fine-tune with:" in result.stdout and "COCO-finetune/" in result.stdout
    return name, model, out


# ------------------------------------------------------------------------------------------
# Same function as timm
# ------------------------------------------------------------------------------------------
@needs_timm
@pytest.mark.parametrize("name", MODELS)
def test_backbone_stages_equal_timm_stages(name):
    model = randomized_timm(name)
    backbone = P.build_backbone(name).eval()
    # odd sizes: ceil-mode pooling and padding at every stride
    x = torch.randn(2, 3, 90, 70, generator=torch.Generator().manual_seed(1))
    for dtype, rtol in ((torch.float32, RTOL32), (torch.float64, RTOL64)):
        model.to(dtype)
        backbone.to(dtype)
        backbone.load_state_dict(P.convert_timm_state_dict(name, model.state_dict(), backbone)
                                 ["model"])
        reference = timm_stage_outputs(model, name, x.to(dtype))
        with torch.no_grad():
            features = backbone(x.to(dtype))
        for k in STAGES:
            assert features[k].shape == reference[k].shape
        errors = relative_errors(features, reference)
        assert max(errors.values()) <= rtol, (dtype, errors)


@needs_timm
def test_nf_options_are_what_makes_it_equal():
    """Without WS_EPS 1e-5 or the average-pool shortcut, the same weights compute another
    function (far beyond the float32 tolerance): the options are needed and the test sees it."""
    name = "nf_resnet50"
    model = randomized_timm(name)
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    reference = timm_stage_outputs(model, name, x)
    for key, default in (("WS_EPS", 1e-6), ("SHORTCUT_AVG_POOL", False)):
        cfg = P.backbone_cfg(name)
        cfg.MODEL.D2NORMS.NF[key] = default
        backbone = build_d2n_resnet_backbone(cfg, ShapeSpec(channels=3)).eval()
        backbone.load_state_dict(P.convert_timm_state_dict(name, model.state_dict(), backbone)
                                 ["model"])
        with torch.no_grad():
            errors = relative_errors(backbone(x), reference)
        assert errors["res5"] > 10 * RTOL32, (key, errors)


@needs_timm
def test_converted_file_loads_into_the_finetuning_models(converted):
    """detectron2's DetectionCheckpointer puts every converted tensor into the Mask R-CNN and
    RetinaNet built from the fine-tuning configs (nothing left at its random init)."""
    name, _, path = converted
    saved = torch.load(path, map_location="cpu", weights_only=True)["model"]
    for config in P.get_timm_spec(name).finetune_configs:
        cfg = finetune_cfg(os.path.join(REPO, "configs", config), "MODEL.WEIGHTS", path)
        model = build_model(cfg)
        DetectionCheckpointer(model).load(cfg.MODEL.WEIGHTS)
        bottom_up = model.backbone.bottom_up.state_dict()
        assert set(bottom_up) == set(saved), config
        for key, value in saved.items():
            assert torch.equal(bottom_up[key], value), (config, key)


@needs_timm
def test_finetuning_configs_set_the_conversion_options():
    for name in MODELS:
        spec = P.get_timm_spec(name)
        for config in spec.finetune_configs:
            cfg = finetune_cfg(os.path.join(REPO, "configs", config))
            for dotted, value in spec.cfg_settings.items():
                node = cfg
                for part in dotted.split("."):
                    node = node[part]
                assert node == value, (config, dotted, node, value)
            assert cfg.MODEL.WEIGHTS == spec.default_output, config


# ------------------------------------------------------------------------------------------
# Preprocessing: the detector sees what timm's model saw during ImageNet training
# ------------------------------------------------------------------------------------------
@needs_timm
def test_detectron2_preprocessing_equals_timm_preprocessing(converted, tmp_path):
    """An image file read as detectron2 reads it (INPUT.FORMAT) and normalized by the model
    (PIXEL_MEAN/STD) equals timm's eval transform (its data config: RGB, /255, ImageNet
    mean/std); the backbone's res2..res5 on it equal timm's stages on timm's input."""
    from PIL import Image
    from timm.data import create_transform, resolve_data_config

    name, timm_model, path = converted
    rng = np.random.RandomState(0)
    image = rng.randint(0, 256, (64, 96, 3), dtype=np.uint8)  # RGB, a multiple of 32: no pad
    file = str(tmp_path / "image.png")
    Image.fromarray(image).save(file)

    data_cfg = resolve_data_config({}, model=timm_model)
    assert data_cfg["mean"] == (0.485, 0.456, 0.406) and data_cfg["std"] == (0.229, 0.224, 0.225)
    # crop_pct 1 at the image's own size: timm's eval pipeline without resizing
    transform = create_transform(**dict(data_cfg, input_size=(3, 64, 96), crop_pct=1.0))
    timm_input = transform(Image.open(file).convert("RGB")).unsqueeze(0)

    cfg = finetune_cfg(os.path.join(REPO, "configs", P.get_timm_spec(name).finetune_configs[0]),
                       "MODEL.WEIGHTS", path)
    model = build_model(cfg).eval()
    DetectionCheckpointer(model).load(cfg.MODEL.WEIGHTS)

    def d2_input(cfg, model):
        read = detection_utils.read_image(file, format=cfg.INPUT.FORMAT)
        tensor = torch.as_tensor(np.ascontiguousarray(read.transpose(2, 0, 1)))
        return model.preprocess_image([{"image": tensor, "height": 64, "width": 96}]).tensor

    d2 = d2_input(cfg, model)
    assert d2.shape == timm_input.shape
    assert (d2 - timm_input).abs().max() <= 1e-5  # float32 rounding of two op orders

    with torch.no_grad():
        errors = relative_errors(model.backbone.bottom_up(d2),
                                 timm_stage_outputs(timm_model, name, timm_input))
    assert max(errors.values()) <= RTOL32, errors

    # detectron2's defaults (BGR, std 1) would feed something else entirely
    stock = get_cfg()
    assert (stock.INPUT.FORMAT, list(stock.MODEL.PIXEL_STD)) != (cfg.INPUT.FORMAT,
                                                                  list(cfg.MODEL.PIXEL_STD))
    cfg.defrost()
    cfg.INPUT.FORMAT, cfg.MODEL.PIXEL_MEAN = stock.INPUT.FORMAT, stock.MODEL.PIXEL_MEAN
    cfg.MODEL.PIXEL_STD = stock.MODEL.PIXEL_STD
    assert (d2_input(cfg, build_model(cfg)) - timm_input).abs().max() > 1.0


# ------------------------------------------------------------------------------------------
# detectron2's Caffe2-style R-50-GN.pkl
# ------------------------------------------------------------------------------------------
_C2_BLOCK_CONVS = {"conv1": "branch2a", "conv2": "branch2b", "conv3": "branch2c",
                   "shortcut": "branch1"}


def caffe2_name(d2_key):
    """detectron2 name -> Caffe2/Detectron1 blob name (conv1_w, res2_0_branch2a_gn_s, ...)."""
    parts = d2_key.split(".")
    leaf = {"weight": "w", "bias": "b"}[parts[-1]]
    if parts[0] == "stem":
        prefix, rest = "conv1", parts[2:-1]
    else:
        prefix, rest = f"{parts[0]}_{parts[1]}_{_C2_BLOCK_CONVS[parts[2]]}", parts[3:-1]
    if rest == ["norm"]:
        return f"{prefix}_gn_{'s' if leaf == 'w' else 'b'}"
    assert not rest, d2_key
    return f"{prefix}_{leaf}"


def test_detectron2_caffe2_gn_pickle_loads_into_gn_resnet(tmp_path):
    """A file in R-50-GN.pkl's format (Caffe2 blob names, numpy arrays, a classifier, momentum
    blobs) loads through DetectionCheckpointer's Caffe2 name conversion into every backbone
    parameter of the model built from mask_rcnn_R_50_FPN_3x_gn_detectron2.yaml."""
    cfg = finetune_cfg(os.path.join(FINETUNE, "mask_rcnn_R_50_FPN_3x_gn_detectron2.yaml"))
    model = build_model(cfg)
    bottom_up = model.backbone.bottom_up.state_dict()
    rng = np.random.RandomState(0)
    blobs = {caffe2_name(k): rng.standard_normal(tuple(v.shape)).astype(np.float32)
             for k, v in bottom_up.items()}
    assert len(blobs) == len(bottom_up)
    blobs["fc1000_w"] = rng.standard_normal((1000, 2048)).astype(np.float32)
    blobs["fc1000_b"] = np.zeros(1000, np.float32)
    blobs["res2_0_branch2a_w_momentum"] = np.zeros_like(blobs["res2_0_branch2a_w"])
    path = str(tmp_path / "R-50-GN.pkl")
    with open(path, "wb") as f:
        pickle.dump(blobs, f)

    DetectionCheckpointer(model).load(path)
    loaded = model.backbone.bottom_up.state_dict()
    for key, value in loaded.items():
        assert np.array_equal(value.numpy(), blobs[caffe2_name(key)]), key
    assert cfg.INPUT.FORMAT == "BGR" and list(cfg.MODEL.PIXEL_STD) == [1.0, 1.0, 1.0]


# ------------------------------------------------------------------------------------------
# Bad input: exit 2, a message naming the problem, no output file
# ------------------------------------------------------------------------------------------
def assert_bad_input(result, out, *fragments):
    assert result.returncode == 2, result.stdout + result.stderr
    for fragment in fragments:
        assert fragment in result.stderr, result.stderr
    assert not os.path.exists(out)
    assert not [f for f in os.listdir(os.path.dirname(out)) if ".tmp-" in f]


def test_unknown_model_lists_supported(tool, tmp_path):
    out = str(tmp_path / "out.pth")
    result = tool("timm", "resnet50", "-o", out)
    assert_bad_input(result, out, "no converter for timm model 'resnet50'", "nf_resnet50",
                     "resnet50_gn")


def test_missing_and_unreadable_checkpoints(tool, tmp_path):
    out = str(tmp_path / "out.pth")
    assert_bad_input(tool("timm", "resnet50_gn", "--checkpoint", str(tmp_path / "nope.pth"),
                              "-o", out), out, "does not exist")
    junk = tmp_path / "junk.pth"
    junk.write_text("not a checkpoint")
    assert_bad_input(tool("timm", "resnet50_gn", "--checkpoint", str(junk), "-o", out),
                     out, "could not be read")
    torch.save([torch.zeros(3)], str(tmp_path / "list.pth"))
    assert_bad_input(tool("timm", "resnet50_gn", "--checkpoint", str(tmp_path / "list.pth"),
                              "-o", out), out, "not a state dict of resnet50_gn")


@needs_timm
def test_checkpoint_of_another_model_names_missing_and_unexpected_keys(tool, tmp_path):
    out = str(tmp_path / "out.pth")
    src = str(tmp_path / "nf.pth")
    torch.save(timm.create_model("nf_resnet50").state_dict(), src)
    result = tool("timm", "resnet50_gn", "--checkpoint", src, "-o", out)
    assert_bad_input(result, out, "not a state dict of timm's resnet50_gn", "missing keys",
                     "conv1.weight", "unexpected keys", "stem.conv.weight")

    truncated = {k: v for k, v in timm.create_model("resnet50_gn").state_dict().items()
                 if not k.startswith("layer4.2.")}
    torch.save({"state_dict": truncated}, src)  # a training checkpoint: unwrapped
    result = tool("timm", "resnet50_gn", "--checkpoint", src, "-o", out)
    assert_bad_input(result, out, "missing keys (9)", "layer4.2.conv1.weight")
    assert "unexpected" not in result.stderr


@needs_timm
def test_width_mismatch(tool, tmp_path):
    from timm.models.resnet import Bottleneck, ResNet

    # Wide ResNet-50-2 with GroupNorm: resnet50_gn's names, twice the bottleneck width
    wide = ResNet(block=Bottleneck, layers=(3, 4, 6, 3), norm_layer="groupnorm", base_width=128)
    src, out = str(tmp_path / "wide.pth"), str(tmp_path / "out.pth")
    torch.save(wide.state_dict(), src)
    result = tool("timm", "resnet50_gn", "--checkpoint", src, "-o", out)
    assert_bad_input(result, out, "width mismatch", "layer1.0.conv1.weight",
                     "(128, 64, 1, 1) in the checkpoint, (64, 64, 1, 1) in resnet50_gn")


# ------------------------------------------------------------------------------------------
# Fine-tuning from the converted weights, through tools/train_net.py
# ------------------------------------------------------------------------------------------
TINY = ["DATASETS.TRAIN", "('synthetic_shapes_tiny_train',)",
        "DATASETS.TEST", "('synthetic_shapes_tiny_val',)", "DATALOADER.NUM_WORKERS", "0",
        "SOLVER.IMS_PER_BATCH", "2", "SOLVER.REFERENCE_WORLD_SIZE", "1",
        "SOLVER.BASE_LR", "0.01", "SOLVER.WARMUP_ITERS", "2",
        "SOLVER.STEPS", "()", "SOLVER.MAX_ITER", "4", "SOLVER.CHECKPOINT_PERIOD", "100",
        "INPUT.MIN_SIZE_TRAIN", "(64,)", "INPUT.MAX_SIZE_TRAIN", "64",
        "INPUT.MIN_SIZE_TEST", "64", "INPUT.MAX_SIZE_TEST", "64",
        "TEST.DETECTIONS_PER_IMAGE", "20", "MODEL.RPN.POST_NMS_TOPK_TEST", "100",
        "MODEL.ROI_HEADS.NUM_CLASSES", "3", "MODEL.RETINANET.NUM_CLASSES", "3"]


@pytest.mark.slow
@needs_timm
def test_finetuning_from_converted_weights(converted, tmp_path, run_command):
    """A few iterations on the synthetic set: trains with finite losses, the frozen stem and
    res2 keep the converted weights exactly (so they were loaded), res3..res5 move."""
    import json

    name, _, path = converted
    config = os.path.join(REPO, "configs", P.get_timm_spec(name).finetune_configs[0])
    out_dir = str(tmp_path / "run")
    run_command([sys.executable, TRAIN_NET, "--config-file", config, *TINY, "MODEL.WEIGHTS", path,
                 "OUTPUT_DIR", out_dir], env=dict(os.environ, OMP_NUM_THREADS="2"))
    with open(os.path.join(out_dir, "metrics.json")) as f:
        losses = [json.loads(line)["total_loss"] for line in f if '"total_loss"' in line]
    assert losses and all(np.isfinite(losses)), losses
    final = torch.load(os.path.join(out_dir, "model_final.pth"), map_location="cpu",
                       weights_only=False)["model"]
    converted_weights = torch.load(path, map_location="cpu", weights_only=True)["model"]
    frozen = [k for k in converted_weights if k.startswith(("stem.", "res2."))]
    trained = [k for k in converted_weights if k.startswith("res5.") and k.endswith("weight")]
    for key in frozen:
        assert torch.equal(final["backbone.bottom_up." + key], converted_weights[key]), key
    assert any(not torch.equal(final["backbone.bottom_up." + k], converted_weights[k])
               for k in trained)


@needs_timm
def test_converted_file_says_what_it_holds_and_another_norm_is_refused(converted):
    """The converted file records its backbone's normalizer: its fine-tuning configs take it,
    a config of another normalizer with the same shapes is refused before training."""
    from d2_norms.config_checks import NORM_RECORD, weights_norm_problem

    name, _, path = converted
    checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    holds = P.get_timm_spec(name).cfg_settings["MODEL.RESNETS.NORM"]
    assert checkpoint[NORM_RECORD]["norms"] == {"MODEL.RESNETS.NORM": holds}
    for config in P.get_timm_spec(name).finetune_configs:
        cfg = finetune_cfg(os.path.join(REPO, "configs", config))
        assert weights_norm_problem(cfg, checkpoint, path) is None, config
        other = cfg.clone()
        other.MODEL.RESNETS.NORM = "GNWS" if holds == "GN" else "GN"
        problem = weights_norm_problem(other, checkpoint, path)
        assert f"MODEL.RESNETS.NORM: {holds!r} in the weights" in problem, problem
