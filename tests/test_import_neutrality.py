"""Importing d2_norms changes no stock detectron2 result (issue 10, item 6).

Stock configs from detectron2's own model zoo (the upstream snapshot's ``configs/``: the v0.6
sdist ships none) are built twice in fresh processes with the same seed: once WITHOUT
``import d2_norms`` and once WITH it. Compared: the class of every module (by name), the
state dict (keys and values) and the eval-mode outputs on the same small image. The process
without d2_norms applies only the environment shims of ``d2_norms/compat.py`` (Pillow, numpy,
the missing ``detectron2._C``), loaded from its file, without which pure-Python detectron2
v0.6 does not import on torch 2.x; those touch no model.
"""
import json
import os
import subprocess
import sys

import pytest
import torch
from torch import nn

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

STOCK_CONFIGS = [
    "COCO-Detection/retinanet_R_50_FPN_1x.yaml",
    "COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_1x.yaml",
    "Misc/mask_rcnn_R_50_FPN_3x_gn.yaml",
    "common/models/mask_rcnn_fpn.py",
]

# Runs in a fresh interpreter: builds every config, writes types / state / outputs.
_BUILD_SCRIPT = r'''
import importlib.util, json, os, sys
import torch

configs_dir, out_path, with_d2_norms, compat_path = sys.argv[1], sys.argv[2], sys.argv[3] == "1", sys.argv[4]
torch.set_num_threads(1)
if with_d2_norms:
    import d2_norms  # noqa: F401
else:
    spec = importlib.util.spec_from_file_location("_env_shims", compat_path)
    shims = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(shims)
    shims.apply()
    assert "d2_norms" not in sys.modules
from detectron2.config import LazyConfig, get_cfg, instantiate
from detectron2.modeling import build_model

results = {}
for name in json.loads(sys.argv[5]):
    path = os.path.join(configs_dir, name)
    try:
        torch.manual_seed(0)
        if name.endswith(".py"):
            cfg = LazyConfig.load(path)
            cfg.model.roi_heads.box_predictor.test_score_thresh = 0.0  # detections to compare
            model = instantiate(cfg.model)
        else:
            cfg = get_cfg()
            cfg.merge_from_file(path)
            cfg.MODEL.DEVICE = "cpu"
            cfg.MODEL.WEIGHTS = ""
            cfg.MODEL.ROI_HEADS.SCORE_THRESH_TEST = 0.0  # random weights: keep detections
            cfg.MODEL.RETINANET.SCORE_THRESH_TEST = 0.0
            model = build_model(cfg)
        model.eval()
        g = torch.Generator().manual_seed(1)
        image = torch.randint(0, 256, (3, 96, 128), generator=g).float()
        with torch.no_grad():
            if hasattr(model, "roi_heads"):
                inst = model.inference([{"image": image}], do_postprocess=False)[0]
            else:
                inst = model([{"image": image}])[0]["instances"]
        outputs = {k: (v.tensor if hasattr(v, "tensor") else v) for k, v in inst.get_fields().items()}
        results[name] = {
            "types": {n: f"{type(m).__module__}.{type(m).__qualname__}" for n, m in model.named_modules()},
            "state": model.state_dict(),
            "outputs": outputs,
        }
    except Exception as e:  # both processes must agree on failures too
        results[name] = {"error": f"{type(e).__name__}: {e}"}
torch.save(results, out_path)
'''




def _build_all(configs_dir, tmp_path, with_d2_norms):
    out = tmp_path / f"built_{int(with_d2_norms)}.pt"
    env = dict(os.environ, D2_NORMS_FRN_IMPL="eager", OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, "-c", _BUILD_SCRIPT, configs_dir, str(out), str(int(with_d2_norms)),
         os.path.join(REPO, "d2_norms", "compat.py"), json.dumps(STOCK_CONFIGS)],
        cwd=str(tmp_path), env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return torch.load(out, weights_only=False)


@pytest.fixture(scope="module")
def built(stock_configs_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("neutrality")
    return (_build_all(stock_configs_dir, tmp, False), _build_all(stock_configs_dir, tmp, True))


@pytest.mark.parametrize("config", STOCK_CONFIGS)
def test_stock_model_is_the_same_with_and_without_d2_norms(built, config):
    without, with_ = built[0][config], built[1][config]
    assert "error" not in without, f"stock detectron2 cannot build {config}: {without['error']}"
    assert "error" not in with_, f"after import d2_norms: {with_['error']}"
    assert with_["types"] == without["types"]
    assert list(with_["state"]) == list(without["state"])
    for key, value in without["state"].items():
        assert torch.equal(with_["state"][key], value), key
    assert sorted(with_["outputs"]) == sorted(without["outputs"])
    for key, value in without["outputs"].items():
        assert value.numel() > 0, f"{config}: no {key} to compare (raise the image size?)"
        assert torch.equal(with_["outputs"][key], value), key


def test_detectron2_get_norm_returns_detectron2_classes_for_its_names():
    import d2_norms.layers.detectron2_hook as hook
    from detectron2.layers import get_norm
    from detectron2.layers.batch_norm import FrozenBatchNorm2d, NaiveSyncBatchNorm

    original = hook._original()
    assert get_norm is hook.detectron2_get_norm and original is not get_norm
    for name in ("BN", "SyncBN", "FrozenBN", "GN", "nnSyncBN", "naiveSyncBN"):
        ours, theirs = get_norm(name, 64), original(name, 64)
        assert type(ours) is type(theirs), name
    assert type(get_norm("GN", 64)) is nn.GroupNorm
    assert isinstance(get_norm("FrozenBN", 8), FrozenBatchNorm2d)
    assert isinstance(get_norm("naiveSyncBN", 8), NaiveSyncBatchNorm)
    assert get_norm("", 8) is None and get_norm(None, 8) is None
    ln = get_norm(lambda c: nn.LayerNorm(c), 5)
    assert type(ln) is nn.LayerNorm
    # d2_norms' names reach stock components where they mean the same network there ...
    from d2_norms.layers import GroupNorm, StockComponentNormError

    assert type(get_norm("GN_G16", 64)) is GroupNorm and get_norm("GN_G16", 64).num_groups == 16
    # ... and are refused where a stock component would build another one
    for name in ("FRN", "GNWS", "NF"):
        with pytest.raises(StockComponentNormError):
            get_norm(name, 64)


def test_stock_fpn_with_gn_scripts_after_import(stock_configs_dir):
    import d2_norms  # noqa: F401  (imported by conftest too: the point of the test)
    from detectron2.config import get_cfg
    from detectron2.modeling import build_backbone

    cfg = get_cfg()
    cfg.merge_from_file(os.path.join(stock_configs_dir, "Misc", "mask_rcnn_R_50_FPN_3x_gn.yaml"))
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.RESNETS.DEPTH = 18  # the same FPN + GN, smaller
    cfg.MODEL.RESNETS.RES2_OUT_CHANNELS = 64
    torch.manual_seed(0)
    backbone = build_backbone(cfg).eval()
    assert any(type(m) is nn.GroupNorm for m in backbone.modules())
    scripted = torch.jit.script(backbone)
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        eager, script = backbone(x), scripted(x)
    assert sorted(eager) == sorted(script)
    for k in eager:
        torch.testing.assert_close(script[k], eager[k], rtol=0, atol=1e-5)
