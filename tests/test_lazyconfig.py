"""Detectron2-style LazyConfigs (issue 20): configs/lazy/ holds model graphs of d2_norms
components with dataloader / optimizer / lr_multiplier / train nodes; ``recipe.norm`` and
``recipe.ims_per_gpu`` select any cell; a lazy model, its schedule and its inputs equal the yacs
cell's with nothing copied between the two configs; the optimizer gives no weight decay to any
normalizer parameter and carries AGC for NF; bad input exits 2 before anything is written; both
trainers (d2_norms' and detectron2's own tools/lazyconfig_train_net.py) run them."""
import json
import os
import re
import sys

import pytest
import torch
from detectron2.config import LazyConfig, instantiate
from detectron2.modeling import build_model
from torch.overrides import TorchFunctionMode

import model_signatures as ms
from d2_norms import recipes
from d2_norms.lazy.engine import lazy_settings, load_lazy_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAZY = os.path.join(REPO, "configs", "lazy")
TOOL = os.path.join(REPO, "tools", "lazyconfig_train_net.py")
COCO = {"retinanet": os.path.join(LAZY, "COCO-scratch", "retinanet_R_{}_FPN.py"),
        "mask_rcnn": os.path.join(LAZY, "COCO-scratch", "mask_rcnn_R_{}_FPN.py")}
SYNTHETIC = {"retinanet": os.path.join(LAZY, "synthetic", "retinanet_R18_FPN_tiny.py"),
             "mask_rcnn": os.path.join(LAZY, "synthetic", "mask_rcnn_R18_FPN_tiny.py")}
ENV = dict(os.environ, OMP_NUM_THREADS="1")


def lazy_config(detector, *overrides, depth=None):
    path = COCO[detector].format(depth) if depth else SYNTHETIC[detector]
    return load_lazy_config(path, list(overrides))


def structure(model):
    return ([(n, type(m).__name__) for n, m in model.named_modules()],
            {k: tuple(v.shape) for k, v in model.state_dict().items()})


def _model_settings(model):
    """What a config sets besides modules and weights: input normalization, anchors, matcher
    and test settings, read from the built model."""
    out = {"pixel_mean": model.pixel_mean.flatten().tolist(),
           "pixel_std": model.pixel_std.flatten().tolist(), "input_format": model.input_format}
    anchors = (model.anchor_generator if hasattr(model, "anchor_generator")
               else model.proposal_generator.anchor_generator)
    out["anchors"] = [a.tolist() for a in anchors.cell_anchors]
    out["strides"] = list(anchors.strides)
    if hasattr(model, "head"):  # RetinaNet
        for key in ("test_score_thresh", "test_topk_candidates", "test_nms_thresh",
                    "max_detections_per_image", "focal_loss_alpha", "focal_loss_gamma",
                    "smooth_l1_beta", "box_reg_loss_type", "num_classes", "head_in_features"):
            out[key] = getattr(model, key)
        out["matcher"] = (model.anchor_matcher.thresholds, model.anchor_matcher.labels)
    else:
        rpn, roi = model.proposal_generator, model.roi_heads
        for key in ("pre_nms_topk", "post_nms_topk", "nms_thresh", "batch_size_per_image",
                    "positive_fraction", "in_features"):
            out["rpn." + key] = getattr(rpn, key)
        predictor = roi.box_predictor
        for key in ("test_score_thresh", "test_nms_thresh", "test_topk_per_image"):
            out["box." + key] = getattr(predictor, key)
        out["roi.batch_size_per_image"] = roi.batch_size_per_image
        out["roi.num_classes"] = roi.num_classes
        out["roi.matcher"] = roi.proposal_matcher.thresholds
    return out


@pytest.mark.parametrize("norm", recipes.NORMALIZERS)
@pytest.mark.parametrize("detector", recipes.DETECTORS)
def test_lazy_model_equals_the_yacs_cell(detector, norm):
    """Module types and names, shapes, outputs (bitwise, name-seeded weights) and the model's
    settings, each side from its own config."""
    lazy = lazy_config(detector, f"recipe.norm={norm}", depth=50)
    yacs_cfg = ms.load_cfg(f"configs/COCO-scratch/{detector}_R_50_FPN_{norm}_2img.yaml")
    mine, theirs = instantiate(lazy.model), build_model(yacs_cfg)
    assert structure(mine) == structure(theirs)
    assert _model_settings(mine) == _model_settings(theirs)
    ms.assert_same_outputs(mine, theirs, yacs_cfg)


def _augmentations(node):
    augs = instantiate(node).augmentations
    out = []
    for a in getattr(augs, "augs", augs):
        short = getattr(a, "short_edge_length", None)
        out.append((type(a).__name__, tuple(short) if short is not None else None,
                    getattr(a, "max_size", None)))
    return out


def _yacs_lrs(cfg, iterations):
    from d2_norms.solver import build_lr_scheduler

    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=cfg.SOLVER.BASE_LR)
    sched = build_lr_scheduler(cfg, opt)
    return [sched._multiplier(i / cfg.SOLVER.MAX_ITER) for i in iterations]


CELLS = [("retinanet", 101, "FRN", 2, "3x", 0.05), ("retinanet", 101, "BN", 8, "3x", 0.1),
         ("retinanet", 50, "NF", 1, "3x", 0.01), ("retinanet", 101, "GN", 4, "3x", 0.05),
         ("mask_rcnn", 50, "GN", 2, "3x", None), ("mask_rcnn", 101, "BN", 4, "3x", None),
         ("mask_rcnn", 50, "NF", 1, "9x", None), ("mask_rcnn", 50, "GNWS", 8, "9x", None)]


@pytest.mark.parametrize("detector,depth,norm,ims,length,lr", CELLS)
def test_one_override_per_field_selects_the_yacs_cells_recipe(detector, depth, norm, ims, length,
                                                              lr):
    """recipe.norm / recipe.ims_per_gpu (and the FRN base lr / the 9x length) on the command
    line give the yacs cell's batch, lr, decay, schedule, periods, clipping, PreciseBN and input
    sizes."""
    extra = [f"recipe.frn_base_lr={lr}"] if lr else ["recipe.length=" + length]
    lazy = lazy_config(detector, f"recipe.norm={norm}", f"recipe.ims_per_gpu={ims}", *extra,
                       depth=depth)
    cell = recipes.config_name(detector, depth, norm, ims, length, lr)
    yacs = ms.load_cfg("configs/COCO-scratch/" + cell)
    settings = lazy_settings(lazy)
    s = yacs.SOLVER
    assert lazy.dataloader.train.total_batch_size == s.IMS_PER_BATCH == settings.SOLVER.IMS_PER_BATCH
    assert lazy.optimizer.lr == pytest.approx(s.BASE_LR, rel=1e-12)
    assert lazy.optimizer.momentum == s.MOMENTUM
    assert lazy.optimizer.weight_decay == s.WEIGHT_DECAY
    assert lazy.train.max_iter == s.MAX_ITER
    assert lazy.train.checkpointer.period == s.CHECKPOINT_PERIOD
    assert lazy.train.eval_period == yacs.TEST.EVAL_PERIOD
    assert lazy.train.precise_bn.enabled == yacs.TEST.PRECISE_BN.ENABLED
    agc = s.CLIP_GRADIENTS.ENABLED and s.CLIP_GRADIENTS.CLIP_TYPE == "agc"
    assert lazy.optimizer.clipping == (s.CLIP_GRADIENTS.CLIP_VALUE if agc else None)
    iterations = sorted({0, 1, s.WARMUP_ITERS // 2, s.WARMUP_ITERS, s.MAX_ITER // 2,
                         *s.STEPS, *(x - 1 for x in s.STEPS), s.MAX_ITER - 1})
    multiplier = instantiate(lazy.lr_multiplier)
    assert [multiplier(i / s.MAX_ITER) for i in iterations] == _yacs_lrs(yacs, iterations)
    mapper = lazy.dataloader.train.mapper
    assert _augmentations(mapper) == [
        ("ResizeShortestEdge", tuple(yacs.INPUT.MIN_SIZE_TRAIN), yacs.INPUT.MAX_SIZE_TRAIN),
        ("RandomFlip", None, None)]
    assert _augmentations(lazy.dataloader.test.mapper) == [
        ("ResizeShortestEdge", (yacs.INPUT.MIN_SIZE_TEST,) * 2, yacs.INPUT.MAX_SIZE_TEST)]
    assert mapper.use_instance_mask == yacs.MODEL.MASK_ON
    assert list(settings.DATASETS.TRAIN) == list(yacs.DATASETS.TRAIN)
    assert list(settings.DATASETS.TEST) == list(yacs.DATASETS.TEST)
    assert settings.MODEL.RESNETS.DEPTH == yacs.MODEL.RESNETS.DEPTH == depth
    for key in ("RESNETS", "FPN", "RETINANET", "RPN", "ROI_BOX_HEAD", "ROI_MASK_HEAD"):
        if detector == "retinanet" and key in ("RPN", "ROI_BOX_HEAD", "ROI_MASK_HEAD"):
            continue
        if detector == "mask_rcnn" and key == "RETINANET":
            continue
        assert settings.MODEL[key].NORM == yacs.MODEL[key].NORM, key


def test_a_part_edit_overrides_the_recipe_and_any_registered_name_works():
    lazy = lazy_config("retinanet", "recipe.norm=FRN_LEPS", "model.backbone.norm=GN_G16")
    model = instantiate(lazy.model)
    from d2_norms.layers import FilterResponseNorm2d, GroupNorm

    frns = [m for m in model.backbone.bottom_up.modules() if isinstance(m, FilterResponseNorm2d)]
    assert frns and all(m.learned_eps is not None for m in frns)
    gns = [m for n, m in model.backbone.named_modules()
           if isinstance(m, GroupNorm) and not n.startswith("bottom_up")]
    assert gns and all(m.num_groups == 16 for m in gns)
    assert lazy.optimizer.clipping is None and lazy.model.head.norm_per_level is True
    nf = lazy_config("mask_rcnn", "recipe.norm=GN", "+recipe.parts={backbone: NF, rpn: NF}")
    assert nf.model.backbone.bottom_up.norm == "NF" and nf.model.backbone.norm == "GN"
    assert nf.model.proposal_generator.head.norm == "NF"
    assert nf.optimizer.clipping == recipes.NF_AGC_CLIPPING  # Scaled WS parts: AGC


class _CallRecorder(TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.names.append(getattr(func, "__name__", str(func)))
        return func(*args, **(kwargs or {}))


def _backbone_calls(model):
    recorder = _CallRecorder()
    with torch.no_grad(), recorder:
        model.backbone(torch.rand(1, 3, 64, 64))
    return recorder.names


@pytest.mark.parametrize("detector", recipes.DETECTORS)
def test_frn_backbone_runs_no_relu(detector):
    """ResNet, FPN (and RetinaNet's P6-P7): TLU where ReLU was, no ReLU module or call."""
    model = instantiate(lazy_config(detector, "recipe.norm=FRN").model).eval()
    assert not [n for n, m in model.backbone.named_modules() if isinstance(m, torch.nn.ReLU)]
    relus = [n for n in _backbone_calls(model) if "relu" in n.lower()]
    assert not relus, relus
    bn = instantiate(lazy_config(detector, "recipe.norm=BN").model).eval()
    assert any("relu" in n.lower() for n in _backbone_calls(bn))  # the probe sees one


def _normalizer_params_by_type(model):
    """Independent of d2_norms.solver: parameters of norm layers by class name, Scaled WS gains
    and biases, SkipInit scalars."""
    names = set()
    for module_name, module in model.named_modules():
        kind = type(module).__name__
        for p_name, _ in module.named_parameters(recurse=False):
            full = f"{module_name}.{p_name}"
            if any(k in kind for k in ("Norm", "FRN", "FilterResponse", "TLU", "Affine")):
                names.add(full)
            elif kind == "ScaledStdConv2d" and p_name in ("gain", "bias"):
                names.add(full)
            elif p_name == "skip_gain":
                names.add(full)
    return names


def _optimizer(lazy, model):
    lazy.optimizer.params.model = model  # what both trainers do
    return instantiate(lazy.optimizer)


@pytest.mark.parametrize("detector", recipes.DETECTORS)
@pytest.mark.parametrize("norm", recipes.NORMALIZERS)
def test_optimizer_gives_no_decay_to_any_normalizer_parameter(detector, norm):
    from d2_norms.solver import SGDWithAGC

    lazy = lazy_config(detector, f"recipe.norm={norm}", depth=50)
    with torch.device("meta"):
        model = instantiate(lazy.model)
    optimizer = _optimizer(lazy, model)
    assert isinstance(optimizer, SGDWithAGC)
    assert optimizer.agc_clipping == (recipes.NF_AGC_CLIPPING if norm == "NF" else None)
    decay = {id(p): g["weight_decay"] for g in optimizer.param_groups for p in g["params"]}
    by_name = {n: decay[id(p)] for n, p in model.named_parameters()}
    norm_params = _normalizer_params_by_type(model)
    assert norm_params  # every normalizer has parameters somewhere (NF: gains, SkipInit)
    assert {n: by_name[n] for n in norm_params} == {n: 0.0 for n in norm_params}
    convs = [n for n in by_name if n.endswith(".weight") and n not in norm_params]
    assert convs and all(by_name[n] == lazy.optimizer.weight_decay > 0 for n in convs)


def test_agc_in_the_optimizer_clips_as_the_yacs_optimizer():
    """The NF node's SGDWithAGC takes the step the yacs cell's AGC optimizer takes."""
    from d2_norms.solver import build_optimizer

    lazy = lazy_config("mask_rcnn", "recipe.norm=NF")
    settings = lazy_settings(lazy)
    torch.manual_seed(0)
    a = instantiate(lazy.model)
    b = instantiate(lazy.model)
    b.load_state_dict(a.state_dict())
    yacs = settings.clone()
    yacs.SOLVER.BASE_LR, yacs.SOLVER.MOMENTUM = lazy.optimizer.lr, lazy.optimizer.momentum
    yacs.SOLVER.WEIGHT_DECAY = lazy.optimizer.weight_decay
    yacs.SOLVER.WEIGHT_DECAY_NORM = 0.0
    yacs.SOLVER.CLIP_GRADIENTS.ENABLED = True
    yacs.SOLVER.CLIP_GRADIENTS.CLIP_TYPE = "agc"
    yacs.SOLVER.CLIP_GRADIENTS.CLIP_VALUE = recipes.NF_AGC_CLIPPING
    opts = [_optimizer(lazy, a), build_optimizer(yacs, b)]
    for model, opt in zip((a, b), opts):
        for p in model.parameters():
            p.grad = torch.full_like(p, 10.0)  # large: AGC clips
        opt.step()
    for (n, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p, q), n


def test_detectron2_optimizer_node_gets_the_decay_warning(caplog):
    """detectron2's own optimizer node decays FRN / TLU parameters: the trainer's warning says
    how many and the fix; d2_norms' parameter groups get none."""
    import logging

    from detectron2.config import LazyCall as L
    from detectron2.solver.build import get_default_optimizer_params

    from d2_norms.lazy import d2_norms_optimizer_params
    from d2_norms.solver import (decayed_normalizer_parameters, normalizer_parameter_names,
                                 warn_decayed_normalizer_parameters)

    model = instantiate(lazy_config("retinanet", "recipe.norm=FRN").model)
    stock = torch.optim.SGD(get_default_optimizer_params(model, weight_decay_norm=0.0), lr=0.1,
                            weight_decay=1e-4)
    log = logging.getLogger("d2_norms.test")
    with caplog.at_level(logging.WARNING, logger="d2_norms.test"):
        decayed = warn_decayed_normalizer_parameters(model, stock, log)
    frn_params = [n for n in normalizer_parameter_names(model) if ".norm." in n or "tau" in n]
    assert decayed and set(frn_params) <= set(decayed)
    assert f"{len(decayed)} normalizer parameters get weight decay" in caplog.text
    assert "d2_norms_optimizer_params" in caplog.text
    node = L(torch.optim.SGD)(params=L(d2_norms_optimizer_params)(weight_decay_norm=0.0),
                              lr=0.1, weight_decay=1e-4)
    node.params.model = model
    assert decayed_normalizer_parameters(model, instantiate(node)) == []


def test_saved_config_round_trips(tmp_path):
    lazy = lazy_config("retinanet", "recipe.norm=NF", "recipe.ims_per_gpu=3")
    path = str(tmp_path / "config.yaml")
    LazyConfig.save(lazy, path)
    assert not os.path.exists(path + ".pkl")
    again = LazyConfig.load(path)  # the d2n_recipe interpolations survive
    assert lazy_settings(again).dump() == lazy_settings(lazy).dump()
    assert again.dataloader.train.total_batch_size == 3 and again.model.backbone.norm == "NF"
    torch.manual_seed(0)
    a, b = instantiate(lazy.model).eval(), instantiate(again.model).eval()
    assert structure(a) == structure(b)


# ------------------------------------------------------------------------------------------------
# The CLI: bad input
# ------------------------------------------------------------------------------------------------
def _cli(args, capsys):
    from d2_norms.lazy.engine import run_cli

    with pytest.raises(SystemExit) as e:
        run_cli(args)
    return e.value.code, capsys.readouterr().err


@pytest.mark.parametrize("overrides,expected", [
    (["recipe.norm=FNR"], r"did you mean 'FRN'"),
    (["recipe.norm=gn"], r"did you mean 'GN'"),
    (["train.max_itr=4", "model.backbone.nrom=GN"],
     r"train.max_itr.*train.max_iter.*model.backbone.nrom.*model.backbone.norm"),
    (["recipe.ims_per_gpu=0"], r"recipe.ims_per_gpu=0"),
    (["+recipe.parts={box_head: GN}"], r"recipe.parts.box_head: a retinanet model has the parts"),
    (["model.backbone.norm=GNN", "model.head.norm=FRM"],
     r"model.backbone.norm='GNN': unknown.*'GN'.*model.head.norm='FRM': unknown.*'FRN'"),
    (["model.pixel_std=[1,1,1]", "recipe.norm=NF"], r"model.pixel_std.*57.375"),
    (["SOLVER.BASE_LR=0.1"], r"LazyConfig keys are the config's node names"),
])
def test_bad_input_exits_2_and_writes_nothing(tmp_path, capsys, overrides, expected):
    out = tmp_path / "run"
    code, err = _cli(["--config-file", SYNTHETIC["retinanet"], *overrides,
                      f"train.output_dir={out}"], capsys)
    assert code == 2, err
    assert re.search(expected, err, re.S), err
    assert not out.exists()


def _user_config(tmp_path, stock_configs_dir, body: str) -> str:
    """A user's detectron2-style config: detectron2's own common model graph, d2_norms'
    synthetic loaders and trainer nodes."""
    config = tmp_path / "user_config.py"
    config.write_text(
        "from detectron2.config import LazyConfig\n"
        "from d2_norms.lazy.components import d2_norms_model\n"
        f"_synthetic = LazyConfig.load({SYNTHETIC['retinanet']!r})\n"
        "dataloader, optimizer, lr_multiplier, train, recipe = (_synthetic.dataloader, "
        "_synthetic.optimizer, _synthetic.lr_multiplier, _synthetic.train, _synthetic.recipe)\n"
        f"model = LazyConfig.load({os.path.join(stock_configs_dir, 'common', 'models', 'retinanet.py')!r}).model\n"
        "model.num_classes = 3\n" + body)
    return str(config)


def test_stock_detectron2_graph_with_d2_norms_names_is_refused(tmp_path, capsys,
                                                               stock_configs_dir):
    config = _user_config(tmp_path, stock_configs_dir,
                          "model.backbone.norm = 'FRN'\nmodel.head.norm = 'GNWS'\n")
    out = tmp_path / "run"
    code, err = _cli(["--config-file", config, f"train.output_dir={out}"], capsys)
    assert code == 2, err
    assert "2 problems" in err or err.count("detectron2's") >= 2, err
    assert re.search(r"model.backbone.norm='FRN': detectron2's FPN builds only", err), err
    assert re.search(r"model.head.norm='GNWS': detectron2's RetinaNetHead", err), err
    assert "d2_norms_model" in err and not out.exists()


def test_lambda_config_warns_instead_of_refusing(caplog):
    """detectron2's own SyncBN baselines hold a lambda: saved as a pickle, with a warning."""
    import logging

    from detectron2.config import LazyCall as L

    from d2_norms.lazy.engine import check_saveable

    lazy = lazy_config("retinanet")
    lazy.model.head.norm = L(lambda c: torch.nn.BatchNorm2d(c))()
    log = logging.getLogger("d2_norms.lazy")  # d2_norms' loggers may not propagate (CLI runs)
    log.addHandler(caplog.handler)
    try:
        with caplog.at_level(logging.WARNING, logger="d2_norms.lazy"):
            check_saveable(lazy, lazy_settings(lazy))
    finally:
        log.removeHandler(caplog.handler)
    assert "config.yaml.pkl" in caplog.text


# ------------------------------------------------------------------------------------------------
# Real runs (slow)
# ------------------------------------------------------------------------------------------------
def lazy_command(out_dir, *extra, resume=False):
    return ([sys.executable, TOOL, "--config-file", SYNTHETIC["mask_rcnn"]]
            + (["--resume"] if resume else [])
            + ["train.max_iter=10", "train.checkpointer.period=3", "train.seed=3",
               f"train.output_dir={out_dir}", *extra])


@pytest.mark.slow
def test_two_gloo_processes_then_eval_only_and_mixed_ap_table(tmp_path, run_command):
    lazy_dir = tmp_path / "lazy"
    proc = run_command([sys.executable, TOOL, "--config-file", SYNTHETIC["retinanet"],
                        "--num-gpus", "2", "train.max_iter=4", f"train.output_dir={lazy_dir}",
                        "model.test_score_thresh=0.0"], env=ENV)
    assert "recipe.num_gpus=1 -> 2" in proc.stdout + proc.stderr
    status = json.load(open(lazy_dir / "run_status.json"))
    assert status["state"] == "finished" and status["world_size"] == 2, status
    results = json.load(open(lazy_dir / "results.json"))
    assert results["run"]["world_size"] == 2 and results["run"]["normalizer"] == "FRN"
    first = results["evaluations"]["synthetic_shapes_tiny_val"]
    assert first["iteration"] == 4
    settings = open(lazy_dir / "settings.yaml").read()
    assert "IMS_PER_BATCH: 4" in settings  # 2 images per process kept
    # evaluation-only from the run's own config.yaml (the saved LazyConfig) reproduces it
    run_command([sys.executable, TOOL, "--config-file", str(lazy_dir / "config.yaml"),
                 "--eval-only", f"train.init_checkpoint={lazy_dir / 'model_final.pth'}"],
                env=ENV)
    again = json.load(open(lazy_dir / "results.json"))["evaluations"]["synthetic_shapes_tiny_val"]
    assert again["metrics"] == first["metrics"] and again["iteration"] == 4
    # a yacs run next to it, one table
    yacs_dir = tmp_path / "yacs"
    run_command([sys.executable, os.path.join(REPO, "tools", "train_net.py"), "--config-file",
                 os.path.join(REPO, "configs", "synthetic", "retinanet_R18_FPN_GN.yaml"),
                 "DATASETS.TRAIN", "('synthetic_shapes_tiny_train',)",
                 "DATASETS.TEST", "('synthetic_shapes_tiny_val',)", "INPUT.MIN_SIZE_TRAIN",
                 "(64,)", "INPUT.MAX_SIZE_TRAIN", "64", "INPUT.MIN_SIZE_TEST", "64",
                 "INPUT.MAX_SIZE_TEST", "64", "SOLVER.IMS_PER_BATCH", "2", "SOLVER.MAX_ITER", "2",
                 "MODEL.DEVICE", "cpu", "DATALOADER.NUM_WORKERS", "0", "OUTPUT_DIR",
                 str(yacs_dir)], env=ENV)
    table = run_command([sys.executable, os.path.join(REPO, "tools", "ap_table.py"), "--json",
                         str(lazy_dir), str(yacs_dir)], env=ENV).stdout
    data = json.loads(table[table.index("{"):])
    assert {r["run"]["normalizer"] for r in data["runs"]} == {"FRN", "GN"}, data["runs"]


@pytest.mark.slow
def test_sigkill_and_resume_end_with_the_same_weights(tmp_path, sigkill_at_checkpoint,
                                                      run_command, assert_bitwise_equal):
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    run_command(lazy_command(whole), env=ENV)
    sigkill_at_checkpoint(lazy_command(killed), str(killed), "model_0000002.pth", env=ENV,
                          cwd=REPO)
    run_command(lazy_command(killed, resume=True), env=ENV)
    a = torch.load(whole / "model_final.pth", weights_only=True)
    b = torch.load(killed / "model_final.pth", weights_only=True)
    assert_bitwise_equal(a["model"], b["model"], "model", dtype=False)
    assert_bitwise_equal(a["trainer"]["_trainer"], b["trainer"]["_trainer"], "optimizer",
                         dtype=False)


def _losses(run_dir):
    rows = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.json"))
            if line.strip()]
    return [r["total_loss"] for r in rows if "total_loss" in r]


USER_MODEL = ("model = d2_norms_model(model, recipe.norm)\n"
              "model.backbone.bottom_up.depth = 18\n"
              "model.backbone.top_block.in_channels = 512\n"
              "model.anchor_generator.sizes = [[8], [16], [32], [64], [128]]\n"
              "model.anchor_generator.aspect_ratios = [0.5, 1.0, 2.0]\n"
              "model.head.num_anchors = 3\n")


@pytest.mark.slow
@pytest.mark.parametrize("norm", ["GN", "GNWS", "FRN", "NF"])
def test_users_detectron2_config_trains_finite_with_d2_norms_trainer(tmp_path, run_command,
                                                                      stock_configs_dir, norm):
    """detectron2's common/models/retinanet.py + d2_norms_model(model, norm) + the synthetic
    set: finite losses for every normalizer, no decayed normalizer parameter."""
    config = _user_config(tmp_path, stock_configs_dir, f"recipe.norm = {norm!r}\n" + USER_MODEL)
    out = tmp_path / "run"
    proc = run_command([sys.executable, TOOL, "--config-file", config, "train.max_iter=3",
                        "train.log_period=1", f"train.output_dir={out}"], env=ENV)
    losses = _losses(out)
    assert losses and all(torch.isfinite(torch.tensor(losses))), losses
    assert "get weight decay" not in proc.stdout + proc.stderr
    assert json.load(open(out / "run_status.json"))["state"] == "finished"


@pytest.mark.slow
@pytest.mark.parametrize("norm", ["GN", "GNWS", "FRN", "NF"])
def test_detectron2s_own_lazy_trainer_runs_d2_norms_configs(tmp_path, run_command,
                                                            stock_tools_dir, stock_configs_dir,
                                                            norm):
    """detectron2 main's own tools/lazyconfig_train_net.py, unchanged: the shipped config and a
    user's config from detectron2's common model train finite, AGC inside the NF optimizer."""
    from d2_norms import compat

    if compat.applied():
        pytest.skip("detectron2's own lazyconfig_train_net.py is main's; this detectron2 needs "
                    f"d2_norms' v0.6 shims ({', '.join(compat.applied())})")
    tool = os.path.join(stock_tools_dir, "lazyconfig_train_net.py")
    for name, config in (("shipped", SYNTHETIC["mask_rcnn"]),
                         ("user", _user_config(tmp_path, stock_configs_dir,
                                               f"recipe.norm = {norm!r}\n" + USER_MODEL
                                               + "train.device = 'cpu'\n"))):
        out = tmp_path / name
        run_command([sys.executable, tool, "--config-file", config, f"recipe.norm={norm}",
                     "train.max_iter=3", "train.log_period=1", "train.eval_period=0",
                     f"train.output_dir={out}"], env=ENV)
        losses = _losses(out)
        assert losses and all(torch.isfinite(torch.tensor(losses))), (name, losses)
        import d2_norms.lazy.recipe  # noqa: F401  (the d2n_recipe resolver the file names)

        saved = LazyConfig.load(str(out / "config.yaml"))
        assert (saved.optimizer.clipping == recipes.NF_AGC_CLIPPING) == (norm == "NF"), name
