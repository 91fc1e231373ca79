"""LazyConfig path (issue 12): generated LazyConfigs build the same settings and models as their
yacs twins, ``recipe.norm`` swaps the normalizer everywhere, the optimizer gives no weight decay
to any normalizer parameter, save/load round-trips, bad input exits 2 before anything is
written, and tools/lazyconfig_train_net.py keeps tools/train_net.py's guarantees (gloo
processes, bitwise resume after SIGKILL, results readable by tools/ap_table.py)."""
import json
import os
import re
import sys

import pytest
import torch
from detectron2.config import LazyConfig, instantiate
from detectron2.modeling import build_model
from torch.overrides import TorchFunctionMode

from d2_norms import recipes
from d2_norms.engine.preflight import load_config
from d2_norms.lazy.configs import lazy_name
from d2_norms.lazy.engine import _fill_and_instantiate, load_lazy_config, settings_of

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAZY = os.path.join(REPO, "configs", "lazy")
TOOL = os.path.join(REPO, "tools", "lazyconfig_train_net.py")
SYNTHETIC = {"retinanet": os.path.join(LAZY, "synthetic", "retinanet_R18_FPN_tiny.py"),
             "mask_rcnn": os.path.join(LAZY, "synthetic", "mask_rcnn_R18_FPN_tiny.py")}
ENV = dict(os.environ, OMP_NUM_THREADS="1")

# The yacs configs the synthetic LazyConfigs must equal, written out independently here.
_TINY = ["DATASETS.TRAIN", "('synthetic_shapes_tiny_train',)",
         "DATASETS.TEST", "('synthetic_shapes_tiny_val',)",
         "INPUT.MIN_SIZE_TRAIN", "(64,)", "INPUT.MAX_SIZE_TRAIN", "64",
         "INPUT.MIN_SIZE_TEST", "64", "INPUT.MAX_SIZE_TEST", "64", "MODEL.DEVICE", "cpu",
         "TEST.DETECTIONS_PER_IMAGE", "20"]
YACS_TWIN = {
    "retinanet": (os.path.join(REPO, "configs", "COCO-scratch", "Base-RetinaNet-scratch.yaml"),
                  _TINY + ["MODEL.RESNETS.DEPTH", "18", "MODEL.RESNETS.RES2_OUT_CHANNELS", "64",
                           "MODEL.FPN.OUT_CHANNELS", "64", "MODEL.RETINANET.NUM_CLASSES", "3",
                           "MODEL.ANCHOR_GENERATOR.SIZES", "[[8], [16], [32], [64], [128]]"]),
    "mask_rcnn": (os.path.join(REPO, "configs", "synthetic", "mask_rcnn_R18_FPN_GN.yaml"),
                  _TINY + ["MODEL.RPN.POST_NMS_TOPK_TEST", "100"]),
}
NORM_KEYS = {"retinanet": ["MODEL.RESNETS.NORM", "MODEL.FPN.NORM", "MODEL.RETINANET.NORM"],
             "mask_rcnn": ["MODEL.RESNETS.NORM", "MODEL.FPN.NORM", "MODEL.ROI_BOX_HEAD.NORM",
                           "MODEL.ROI_MASK_HEAD.NORM"]}


def yacs_twin(detector, norm):
    base, opts = YACS_TWIN[detector]
    # every norm key of the cell, as the generated yacs files set them (NF: the RPN's too)
    for key, value in recipes.norm_fields(detector, norm).items():
        opts = opts + [key, value]
    assert set(NORM_KEYS[detector]) <= set(recipes.norm_fields(detector, norm))
    return load_config(base, opts)


def lazy_config(detector, *overrides):
    return load_lazy_config(SYNTHETIC[detector], list(overrides))


def structure(model):
    return ([(n, type(m).__name__) for n, m in model.named_modules()],
            {k: tuple(v.shape) for k, v in model.state_dict().items()})


@pytest.mark.slow  # ~25 s: 216 configs
def test_every_lazy_twin_builds_its_yacs_twins_settings():
    cells = list(recipes.matrix_cells())
    assert len(cells) == len(os.listdir(os.path.join(LAZY, "COCO-scratch")))
    for cell in cells:
        name = lazy_name(*cell)
        lazy = LazyConfig.load(os.path.join(LAZY, "COCO-scratch", name))
        mine = instantiate(lazy.settings)
        theirs = load_config(os.path.join(REPO, "configs", "COCO-scratch",
                                          name[:-3] + ".yaml"), [])
        assert mine.OUTPUT_DIR == "output/lazy/COCO-scratch/" + name[:-3]
        mine.OUTPUT_DIR = theirs.OUTPUT_DIR
        assert mine.dump() == theirs.dump(), name


@pytest.mark.parametrize("detector", recipes.DETECTORS)
@pytest.mark.parametrize("norm", recipes.NORMALIZERS)
def test_recipe_fields_swap_norm_and_batch_like_the_yacs_cell(detector, norm):
    """One field changes the normalizer (and one the images per GPU) of a COCO twin: the result
    is the yacs file of that other cell, and its model has the same modules and shapes."""
    lazy = LazyConfig.load(os.path.join(LAZY, "COCO-scratch", lazy_name(detector, 50, "BN", 2)))
    lazy = LazyConfig.apply_overrides(lazy, [f"recipe.norm={norm}", "recipe.ims_per_gpu=4"])
    mine = instantiate(lazy.settings)
    theirs = load_config(os.path.join(REPO, "configs", "COCO-scratch",
                                      recipes.config_name(detector, 50, norm, 4)), [])
    mine.OUTPUT_DIR = theirs.OUTPUT_DIR
    assert mine.dump() == theirs.dump()
    with torch.device("meta"):
        lazy.train.device = "meta"
        lazy_model = instantiate(lazy.model)
        theirs.MODEL.DEVICE = "meta"
        yacs_model = build_model(theirs)
    assert structure(lazy_model) == structure(yacs_model)


@pytest.mark.parametrize("detector", recipes.DETECTORS)
@pytest.mark.parametrize("norm", recipes.NORMALIZERS)
def test_lazy_model_equals_yacs_model(detector, norm):
    torch.manual_seed(0)
    lazy_model = instantiate(lazy_config(detector, f"recipe.norm={norm}").model).eval()
    yacs_model = build_model(yacs_twin(detector, norm)).eval()
    assert structure(lazy_model) == structure(yacs_model)
    yacs_model.load_state_dict(lazy_model.state_dict())
    image = torch.rand(3, 64, 64) * 255
    with torch.no_grad():
        features = [m.backbone(m.preprocess_image([{"image": image}]).tensor)
                    for m in (lazy_model, yacs_model)]
        outputs = [m([{"image": image, "height": 64, "width": 64}])[0]["instances"]
                   for m in (lazy_model, yacs_model)]
    for name in features[0]:
        assert torch.equal(features[0][name], features[1][name]), name
    assert torch.equal(outputs[0].pred_boxes.tensor, outputs[1].pred_boxes.tensor)
    assert torch.equal(outputs[0].scores, outputs[1].scores)


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
    # the same probe sees ReLU in the BN model (it would catch one)
    bn = instantiate(lazy_config(detector, "recipe.norm=BN").model).eval()
    assert any("relu" in n.lower() for n in _backbone_calls(bn))


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


@pytest.mark.parametrize("detector", recipes.DETECTORS)
@pytest.mark.parametrize("norm", recipes.NORMALIZERS)
def test_optimizer_gives_no_decay_to_any_normalizer_parameter(detector, norm):
    lazy = lazy_config(detector, f"recipe.norm={norm}")
    cfg = settings_of(lazy)
    model = instantiate(lazy.model)
    optimizer = _fill_and_instantiate(lazy.optimizer, cfg=cfg, model=model)
    decay = {id(p): g["weight_decay"] for g in optimizer.param_groups for p in g["params"]}
    by_name = {n: decay[id(p)] for n, p in model.named_parameters()}
    norm_params = _normalizer_params_by_type(model)
    assert norm_params  # every normalizer has parameters somewhere (NF: gains, SkipInit)
    assert {n: by_name[n] for n in norm_params} == {n: 0.0 for n in norm_params}
    convs = [n for n in by_name if n.endswith(".weight") and n not in norm_params]
    assert convs and all(by_name[n] == cfg.SOLVER.WEIGHT_DECAY > 0 for n in convs)


def test_detectron2_style_optimizer_node_with_d2_norms_params():
    """In a detectron2-style LazyConfig (configs/common/optim.py), d2_norms_optimizer_params
    replaces get_default_optimizer_params: same groups for torch's norms, no decay for FRN/TLU
    (which detectron2's function decays)."""
    from detectron2.config import LazyCall as L
    from detectron2.solver.build import get_default_optimizer_params

    from d2_norms.lazy import d2_norms_optimizer_params

    model = instantiate(lazy_config("retinanet", "recipe.norm=FRN").model)
    node = L(torch.optim.SGD)(params=L(d2_norms_optimizer_params)(weight_decay_norm=0.0),
                              lr=0.02, momentum=0.9, weight_decay=1e-4)
    node.params.model = model
    ours = instantiate(node)
    decay = {id(p): g["weight_decay"] for g in ours.param_groups for p in g["params"]}
    stock = get_default_optimizer_params(model, weight_decay_norm=0.0)
    stock_decay = {id(p): g.get("weight_decay", 1e-4) for g in stock for p in g["params"]}
    frn = [p for n, m in model.named_modules() if "FilterResponse" in type(m).__name__
           or type(m).__name__ == "TLU" for p in m.parameters(recurse=False)]
    assert frn and all(decay[id(p)] == 0.0 for p in frn)
    assert all(stock_decay[id(p)] == 1e-4 for p in frn)  # the gap this function closes
    for n, p in model.named_parameters():
        if id(p) not in {id(q) for q in frn}:
            assert decay[id(p)] == stock_decay[id(p)], n



def test_optimizer_that_decays_normalizer_parameters_is_warned_about(caplog):
    """detectron2's own optimizer node decays FRN / TLU parameters: the trainer's warning says
    how many and the fix; d2_norms' parameter groups get no warning."""
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
    assert decayed and set(decayed) <= set(normalizer_parameter_names(model))
    assert set(frn_params) <= set(decayed)
    assert f"{len(decayed)} normalizer parameters get weight decay" in caplog.text
    assert "d2_norms_optimizer_params" in caplog.text and "WEIGHT_DECAY_NORM" in caplog.text
    node = L(torch.optim.SGD)(params=L(d2_norms_optimizer_params)(weight_decay_norm=0.0),
                              lr=0.1, weight_decay=1e-4)
    node.params.model = model
    assert decayed_normalizer_parameters(model, instantiate(node)) == []


def test_saved_config_round_trips(tmp_path):
    lazy = lazy_config("retinanet", "recipe.norm=NF", "recipe.ims_per_gpu=3")
    cfg = settings_of(lazy)
    path = str(tmp_path / "config.yaml")
    LazyConfig.save(lazy, path)
    assert not os.path.exists(path + ".pkl")
    again = LazyConfig.load(path)
    assert instantiate(again.settings).dump() == cfg.dump()
    assert cfg.SOLVER.IMS_PER_BATCH == 3 and cfg.MODEL.RESNETS.NORM == "NF"
    torch.manual_seed(0)
    a = instantiate(lazy.model).eval()
    b = instantiate(again.model).eval()
    assert structure(a) == structure(b)
    b.load_state_dict(a.state_dict())
    image = torch.rand(3, 64, 64) * 255
    with torch.no_grad():
        fa, fb = (m.backbone(m.preprocess_image([{"image": image}]).tensor) for m in (a, b))
    assert all(torch.equal(fa[k], fb[k]) for k in fa)


# ------------------------------------------------------------------------------------------------
# The CLI: bad input
# ------------------------------------------------------------------------------------------------
def _cli(args, capsys):
    from d2_norms.lazy.engine import run_cli

    with pytest.raises(SystemExit) as e:
        run_cli(args)
    return e.value.code, capsys.readouterr().err


@pytest.mark.parametrize("override,expected", [
    ("recipe.norm=FNR", r"recipe.norm='FNR'.*Did you mean 'FRN'"),
    ("recipe.norm=gn", r"Did you mean 'GN'"),
    ("train.max_itr=4", r"unknown config key 'train.max_itr'.*'train.max_iter'"),
    ("settings.overrides.SOLVER.BASE_LRR=0.1", r"SOLVER.BASE_LRR.*'SOLVER.BASE_LR'"),
    ("recipe.ims_per_gpu=0", r"recipe.ims_per_gpu=0"),
    ("SOLVER.BASE_LR=0.1", r"settings.overrides.SOLVER.BASE_LR"),
])
def test_bad_input_exits_2_and_writes_nothing(tmp_path, capsys, override, expected):
    out = tmp_path / "run"
    code, err = _cli(["--config-file", SYNTHETIC["retinanet"], override,
                      f"train.output_dir={out}"], capsys)
    assert code == 2, err
    assert re.search(expected, err, re.S), err
    assert not out.exists()


def test_config_that_cannot_be_saved_is_refused(tmp_path, capsys):
    config = tmp_path / "with_lambda.py"
    config.write_text(
        "from detectron2.config import LazyConfig, LazyCall as L\n"
        "from d2_norms.lazy import build_optimizer\n"
        f"_base = LazyConfig.load({SYNTHETIC['retinanet']!r})\n"
        "recipe, train, settings, model = _base.recipe, _base.train, _base.settings, _base.model\n"
        "optimizer = L(lambda cfg, model: build_optimizer(cfg, model))("
        "cfg='${settings}', model=None)\n")
    out = tmp_path / "run"
    code, err = _cli(["--config-file", str(config), f"train.output_dir={out}"], capsys)
    assert code == 2, err
    assert "cannot be saved" in err
    assert not out.exists()


# ------------------------------------------------------------------------------------------------
# The CLI: real runs (slow)
# ------------------------------------------------------------------------------------------------
def lazy_command(out_dir, *extra, resume=False):
    return ([sys.executable, TOOL, "--config-file", SYNTHETIC["mask_rcnn"]]
            + (["--resume"] if resume else [])
            + ["train.max_iter=10", "train.checkpointer.period=3", "train.seed=3",
               f"train.output_dir={out_dir}", *extra])


@pytest.mark.slow
def test_two_gloo_processes_then_eval_only_and_mixed_ap_table(tmp_path, run_command):
    lazy_dir = tmp_path / "lazy"
    run_command([sys.executable, TOOL, "--config-file", SYNTHETIC["retinanet"], "--num-gpus", "2",
                 "train.max_iter=4", f"train.output_dir={lazy_dir}",
                 "settings.overrides.MODEL.RETINANET.SCORE_THRESH_TEST=0.0"], env=ENV)
    status = json.load(open(lazy_dir / "run_status.json"))
    assert status["state"] == "finished" and status["world_size"] == 2, status
    results = json.load(open(lazy_dir / "results.json"))
    assert results["run"]["world_size"] == 2 and results["run"]["normalizer"] == "FRN"
    first = results["evaluations"]["synthetic_shapes_tiny_val"]
    # evaluation-only from the run's own config.yaml (the saved LazyConfig) reproduces it
    run_command([sys.executable, TOOL, "--config-file", str(lazy_dir / "config.yaml"),
                 "--eval-only", f"train.init_checkpoint={lazy_dir / 'model_final.pth'}"],
                env=ENV)
    again = json.load(open(lazy_dir / "results.json"))["evaluations"]["synthetic_shapes_tiny_val"]
    # REFERENCE_WORLD_SIZE 1 (recipe.reference_world_size): 2 processes keep the images per
    # process, double the batch and halve the schedule, as tools/train_net.py does
    assert first["iteration"] == 2 == again["iteration"]
    assert again["metrics"] == first["metrics"]
    # a yacs run next to it, one table
    yacs_dir = tmp_path / "yacs"
    base, opts = YACS_TWIN["retinanet"]
    norms = [x for key in NORM_KEYS["retinanet"] for x in (key, "GN")]
    run_command([sys.executable, os.path.join(REPO, "tools", "train_net.py"), "--config-file",
                 base, *opts, *norms, "SOLVER.IMS_PER_BATCH", "2", "SOLVER.MAX_ITER", "2",
                 "SOLVER.BASE_LR", "0.005", "SOLVER.STEPS", "()", "SOLVER.WARMUP_ITERS", "2",
                 "TEST.EVAL_PERIOD", "0", "MODEL.RETINANET.SCORE_THRESH_TEST", "0.0",
                 "DATALOADER.NUM_WORKERS", "0", "OUTPUT_DIR", str(yacs_dir)], env=ENV)
    table = run_command([sys.executable, os.path.join(REPO, "tools", "ap_table.py"), "--json",
                         str(lazy_dir), str(yacs_dir)], env=ENV).stdout
    data = json.loads(table[table.index("{"):])
    normalizers = {r["run"]["normalizer"] for r in data["runs"]}
    assert normalizers == {"FRN", "GN"}, data["runs"]


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


def test_every_finetune_lazy_twin_builds_its_yacs_files_settings():
    """configs/lazy/COCO-finetune/<stem>.py gives exactly configs/COCO-finetune/<stem>.yaml's
    settings (the pretrained weights, RGB ImageNet pixel statistics and norms included)."""
    from d2_norms.lazy.configs import finetune_stems

    stems = finetune_stems()
    assert stems and len(stems) == len(os.listdir(os.path.join(LAZY, "COCO-finetune")))
    for stem in stems:
        lazy = LazyConfig.load(os.path.join(LAZY, "COCO-finetune", stem + ".py"))
        mine = instantiate(lazy.settings)
        theirs = load_config(os.path.join(REPO, "configs", "COCO-finetune", stem + ".yaml"), [])
        assert mine.OUTPUT_DIR == "output/lazy/COCO-finetune/" + stem
        mine.OUTPUT_DIR = theirs.OUTPUT_DIR
        assert mine.dump() == theirs.dump(), stem
