"""detectron2's own LazyConfig model graphs (configs/common/models of the detectron2 snapshot)
rebuilt from d2_norms' components by ``d2_norms.lazy.components.d2_norms_model``: for every
normalizer the model equals the yacs cell's (module types, parameter names and shapes, outputs
of every component with the same weights); the graph stays plain, saveable LazyCall data."""
import os

import pytest
import torch

import d2_norms  # noqa: F401
import model_signatures as ms
from d2_norms.engine.errors import LazyConfigError
from d2_norms.lazy.components import d2_norms_model, d2n_resnet

NORMS = ["BN", "SyncBN", "GN", "GNWS", "FRN", "NF"]
STOCK = {"retinanet": "retinanet.py", "mask_rcnn": "mask_rcnn_fpn.py"}


def _stock_model(configs_dir, detector):
    from detectron2.config import LazyConfig

    return LazyConfig.load(os.path.join(configs_dir, "common", "models", STOCK[detector])).model


@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("detector", sorted(STOCK))
def test_stock_graph_with_d2_norms_components_equals_the_yacs_cell(stock_configs_dir, detector,
                                                                   norm):
    from detectron2.config import instantiate
    from detectron2.modeling import build_model

    graph = d2_norms_model(_stock_model(stock_configs_dir, detector), norm)
    yacs_cfg = ms.load_cfg(f"configs/COCO-scratch/{detector}_R_50_FPN_{norm}_2img.yaml")
    # nothing copied from one config into the other: d2_norms_model sets the from-scratch
    # input normalization itself (detectron2's common models have pixel_std 1)
    assert list(graph.pixel_mean) == list(yacs_cfg.MODEL.PIXEL_MEAN)
    assert list(graph.pixel_std) == list(yacs_cfg.MODEL.PIXEL_STD)
    assert graph.input_format == yacs_cfg.INPUT.FORMAT
    lazy, yacs = instantiate(graph), build_model(yacs_cfg)
    assert [(n, type(m)) for n, m in lazy.named_modules()] == \
        [(n, type(m)) for n, m in yacs.named_modules()]
    assert [(k, v.shape) for k, v in lazy.state_dict().items()] == \
        [(k, v.shape) for k, v in yacs.state_dict().items()]
    ms.assert_same_outputs(lazy, yacs, yacs_cfg)  # same ops in the same order: bitwise


def test_graph_is_editable_and_survives_save_and_load(stock_configs_dir, tmp_path):
    from detectron2.config import LazyConfig, instantiate

    from d2_norms.layers import FilterResponseNorm2d

    cfg = LazyConfig.load(os.path.join(stock_configs_dir, "common", "models", "retinanet.py"))
    cfg.model = d2_norms_model(cfg.model, "FRN")
    cfg.model.backbone.bottom_up.depth = 18  # edited in place, detectron2-style
    cfg.model.backbone.bottom_up.out_features = ["res3", "res4", "res5"]
    cfg.model.backbone.top_block.in_channels = 512
    path = str(tmp_path / "frn_retinanet.yaml")
    LazyConfig.save(cfg, path)
    model = instantiate(LazyConfig.load(path).model)
    assert len(model.backbone.bottom_up.res4) == 2  # R18
    assert all(m.has_tlu for m in model.head.cls_subnet if isinstance(m, FilterResponseNorm2d))
    assert not any(isinstance(m, torch.nn.ReLU) for m in model.backbone.modules())


def test_bad_graphs_and_settings_are_refused():
    from detectron2.config import LazyCall as L
    from detectron2.modeling import GeneralizedRCNN

    with pytest.raises(LazyConfigError, match="neither a RetinaNet nor a GeneralizedRCNN"):
        d2_norms_model(L(GeneralizedRCNN)(backbone=None), "GN")
    with pytest.raises(KeyError, match="not an NF-ResNet setting.*alpha"):
        d2n_resnet(depth=18, norm="NF", nf={"alpah": 0.3})
    with pytest.raises(ValueError, match="unknown normalizer"):
        d2_norms_model(L(GeneralizedRCNN)(backbone={"bottom_up": {}}, roi_heads={},
                                          proposal_generator={}), "NoSuchNorm")


def test_any_registered_name_and_per_part_names(stock_configs_dir, caplog):
    import logging

    from detectron2.config import instantiate

    from d2_norms.layers import FilterResponseNorm2d, GroupNorm

    with caplog.at_level(logging.INFO, logger="d2_norms.lazy"):
        graph = d2_norms_model(_stock_model(stock_configs_dir, "retinanet"), "FRN_LEPS",
                               parts={"fpn": "GN_G16"})
    assert "pixel_std: [1.0, 1.0, 1.0] -> [57.375, 57.12, 58.395]" in caplog.text
    assert "NormFPN (norm 'GN_G16')" in caplog.text
    graph.backbone.bottom_up.depth = 18
    graph.backbone.bottom_up.out_features = ["res3", "res4", "res5"]
    graph.backbone.top_block.in_channels = 512
    graph.backbone.in_features = ["res3", "res4", "res5"]
    model = instantiate(graph)
    frns = [m for m in model.backbone.bottom_up.modules() if isinstance(m, FilterResponseNorm2d)]
    assert frns and all(m.learned_eps is not None for m in frns)
    gns = [m for n, m in model.backbone.named_modules()
           if isinstance(m, GroupNorm) and not n.startswith("bottom_up")]
    assert gns and all(m.num_groups == 16 for m in gns)
    with pytest.raises(LazyConfigError, match="did you mean 'FRN_LEPS'"):
        d2_norms_model(_stock_model(stock_configs_dir, "retinanet"), "FNR_LEPS")
    with pytest.raises(LazyConfigError, match="parts=.*box_head"):
        d2_norms_model(_stock_model(stock_configs_dir, "retinanet"), "GN",
                       parts={"box_head": "GN"})


def test_nf_keeping_detectron2s_pixel_std_is_refused(stock_configs_dir):
    with pytest.raises(LazyConfigError, match=r"pixel_std.*unit-variance.*57.375"):
        d2_norms_model(_stock_model(stock_configs_dir, "retinanet"), "NF", input_std=False)
    graph = d2_norms_model(_stock_model(stock_configs_dir, "retinanet"), "GN", input_std=False)
    assert list(graph.pixel_std) == [1.0, 1.0, 1.0]  # kept, as asked (not NF)
