"""Schedules follow the papers' rules at every batch size; the committed config matrix is what
the generator produces; LR schedules and optimizer groups behave as documented."""
import math
import os
import subprocess
import sys

import pytest
import torch

import d2_norms  # noqa: F401
from d2_norms import recipes
from d2_norms.engine.defaults import setup_cfg

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MATRIX_DIR = os.path.join(REPO, "configs", "COCO-scratch")


@pytest.mark.parametrize("ims_per_gpu", [1, 2, 4, 8])
@pytest.mark.parametrize("base_lr", [0.01, 0.05, 0.1])
def test_frn_rule(ims_per_gpu, base_lr):
    # FRN sec. 4.3 written out: batch M -> 125000 * 64 / M iterations at base_lr * M / 64.
    M = ims_per_gpu * 8
    s = recipes.schedule_for("retinanet", ims_per_gpu, frn_base_lr=base_lr)
    assert s.ims_per_batch == M
    assert s.max_iter == 125000 * 64 // M
    assert math.isclose(s.base_lr, base_lr * M / 64)
    assert s.lr_scheduler_name == "WarmupCosineLR" and s.warmup_method == "cosine"
    assert s.weight_decay == 4e-4 and s.momentum == 0.9
    # lr * iterations is constant across batch sizes (linear scaling)
    assert math.isclose(s.base_lr * s.max_iter, base_lr * 125000)


@pytest.mark.parametrize("ims_per_gpu", [1, 2, 4, 8])
@pytest.mark.parametrize("length,iters,steps", [("3x", 270000, (210000, 250000)),
                                                ("9x", 810000, (750000, 790000))])
def test_gn_rule(ims_per_gpu, length, iters, steps):
    M = ims_per_gpu * 8
    s = recipes.schedule_for("mask_rcnn", ims_per_gpu, length=length)
    assert s.max_iter == iters * 16 // M
    assert s.steps == tuple(x * 16 // M for x in steps)
    assert math.isclose(s.base_lr, 0.02 * M / 16)
    assert s.lr_scheduler_name == "WarmupMultiStepLR"


def test_bad_recipe_arguments_are_explained():
    with pytest.raises(ValueError, match="unknown normalizer 'LN'"):
        recipes.norm_fields("retinanet", "LN")
    with pytest.raises(ValueError, match="positive integer"):
        recipes.frn_retinanet_schedule(0)
    with pytest.raises(ValueError, match="unknown schedule"):
        recipes.gn_mask_rcnn_schedule(16, "2x")


def test_committed_matrix_has_no_drift():
    out = subprocess.run([sys.executable, os.path.join(REPO, "tools", "make_configs.py"),
                          "--check"], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def test_generator_detects_drift(tmp_path):
    assert len(recipes.write_matrix(str(tmp_path))) == len(list(recipes.matrix_cells()))
    assert recipes.write_matrix(str(tmp_path), check=True) == []
    victim = tmp_path / recipes.config_name("retinanet", 50, "FRN", 2)
    victim.write_text(victim.read_text().replace("BASE_LR: 0.0125", "BASE_LR: 0.02"))
    (tmp_path / "hand_written.yaml").write_text("MODEL: {}\n")
    drift = recipes.write_matrix(str(tmp_path), check=True)
    assert victim.name in drift
    assert any("hand_written.yaml" in d for d in drift)


def _cfg(path, *opts):
    class Args:
        config_file = path
    Args.opts = list(opts)
    return setup_cfg(Args, log=False)


@pytest.mark.parametrize("name", sorted(f for f in os.listdir(MATRIX_DIR)
                                        if f.endswith(".yaml") and not f.startswith("Base-")))
def test_matrix_config_loads_with_rule_values(name):
    cfg = _cfg(os.path.join(MATRIX_DIR, name))
    cell = next(c for c in recipes.matrix_cells() if recipes.config_name(*c) == name)
    detector, depth, normalizer, ims, length, lr = cell
    sched = recipes.schedule_for(detector, ims, length=length,
                                 frn_base_lr=lr or recipes.FRN_DEFAULT_BASE_LR)
    assert cfg.SOLVER.IMS_PER_BATCH // cfg.SOLVER.REFERENCE_WORLD_SIZE == ims
    assert cfg.SOLVER.MAX_ITER == sched.max_iter and cfg.SOLVER.BASE_LR == pytest.approx(sched.base_lr)
    assert cfg.MODEL.RESNETS.DEPTH == depth and cfg.MODEL.RESNETS.NORM == normalizer
    assert cfg.MODEL.WEIGHTS == "" and cfg.MODEL.BACKBONE.FREEZE_AT == 0
    assert cfg.SOLVER.WEIGHT_DECAY_NORM == 0.0
    # Issue 13 item 8: NF means Scaled WS in every conv, the RPN head's too (the others leave
    # the RPN head unnormalized, as the GN paper and detectron2).
    nf_rpn = detector == "mask_rcnn" and normalizer == "NF"
    assert cfg.MODEL.RPN.NORM == ("NF" if nf_rpn else "")
    # Issue 11: d2_norms' registered components, built for the norm from the start.
    if detector == "retinanet":
        assert cfg.MODEL.META_ARCHITECTURE == "D2NormsRetinaNet"
    else:
        assert cfg.MODEL.META_ARCHITECTURE == "GeneralizedRCNN"
        assert (cfg.MODEL.RPN.HEAD_NAME, cfg.MODEL.ROI_BOX_HEAD.NAME,
                cfg.MODEL.ROI_MASK_HEAD.NAME) == ("D2NormsRPNHead", "D2NormsConvFCHead",
                                                  "D2NormsMaskHead")
    # Issue 13 item 4: Mask R-CNN trains single-scale 800 / max 1333 (GN Table 7's setting).
    if detector == "mask_rcnn":
        assert tuple(cfg.INPUT.MIN_SIZE_TRAIN) == (800,) and cfg.INPUT.MAX_SIZE_TRAIN == 1333
    # Item 6: PreciseBN where detectron2 uses it (its SyncBN Mask R-CNN configs), nowhere else.
    # (issue 23: RetinaNet BN cells too, for the TPU RetinaNet's slow BN averages)
    assert cfg.TEST.PRECISE_BN.ENABLED == (normalizer in ("BN", "SyncBN"))
    # Item 9: the NF recipe adds AGC; nothing else clips.
    clip = cfg.SOLVER.CLIP_GRADIENTS
    assert clip.ENABLED == (normalizer == "NF")
    if normalizer == "NF":
        assert clip.CLIP_TYPE == "agc" and clip.CLIP_VALUE == recipes.NF_AGC_CLIPPING
    # Item 7: RetinaNet heads get one norm per pyramid level (TPU RetinaNet, FRN Table 6) where
    # there is a norm module (not NF); the key is absent from every other file.
    per_level = detector == "retinanet" and normalizer != "NF"
    assert cfg.MODEL.RETINANET.NORM_PER_LEVEL is per_level
    # Issue 20: the file names its normalizer in one field; the per-part keys and extras above
    # come from it (no per-part NORM key, clipping or per-level key is written in the file)
    text = open(os.path.join(MATRIX_DIR, name)).read()
    assert f'D2NORMS:\n    NORM: "{normalizer}"' in text
    assert text.count("\n    NORM: ") == 1
    for key in ("NORM_PER_LEVEL", "CLIP_GRADIENTS", "PRECISE_BN", "FPN:", "RETINANET:", "RPN:",
                "ROI_BOX_HEAD:", "ROI_MASK_HEAD:"):
        assert key not in text, key


def _cell_with_edit(tmp_path, name, old, new):
    text = open(os.path.join(MATRIX_DIR, name)).read()
    assert old in text
    edited = tmp_path / name
    edited.write_text(text.replace(old, new))
    for base in ("Base-RetinaNet-scratch.yaml", "Base-MaskRCNN-scratch.yaml"):
        (tmp_path / base).write_text(open(os.path.join(MATRIX_DIR, base)).read().replace(
            '"../Base-', f'"{os.path.dirname(MATRIX_DIR)}/Base-'))
    return str(edited)


@pytest.mark.parametrize("detector,old,new", [
    ("retinanet", "FRN", "NF"), ("retinanet", "NF", "GN"), ("mask_rcnn", "NF", "BN"),
    ("mask_rcnn", "GN", "NF"), ("mask_rcnn", "FRN", "GNWS")])
def test_one_edit_changes_a_cells_normalizer_everywhere(tmp_path, detector, old, new):
    """Editing MODEL.D2NORMS.NORM in a cell gives exactly the cell of the other normalizer
    (every norm key, per-level heads, RPN norm, AGC, PreciseBN): the whole config is equal."""
    from d2_norms.engine.preflight import load_config

    name = recipes.config_name(detector, 50, old, 2, "3x", 0.05 if detector == "retinanet"
                               else None)
    edited = _cell_with_edit(tmp_path, name, f'NORM: "{old}"', f'NORM: "{new}"')
    mine = load_config(edited, [])
    target = load_config(os.path.join(MATRIX_DIR, name.replace(f"_{old}_", f"_{new}_")), [])
    mine.OUTPUT_DIR = target.OUTPUT_DIR
    assert mine.dump() == target.dump()


def test_per_part_keys_and_command_line_override_the_one_field(tmp_path):
    from d2_norms.engine.preflight import load_config

    name = "mask_rcnn_R_50_FPN_FRN_2img.yaml"
    edited = _cell_with_edit(tmp_path, name, 'NORM: "FRN"',
                             'NORM: "NF"\n  FPN:\n    NORM: "GN"')
    cfg = load_config(edited, ["MODEL.ROI_MASK_HEAD.NORM", "FRN_LEPS"])
    assert (cfg.MODEL.RESNETS.NORM, cfg.MODEL.FPN.NORM, cfg.MODEL.ROI_BOX_HEAD.NORM,
            cfg.MODEL.ROI_MASK_HEAD.NORM, cfg.MODEL.RPN.NORM) == ("NF", "GN", "NF", "FRN_LEPS",
                                                                  "NF")
    assert cfg.SOLVER.CLIP_GRADIENTS.CLIP_TYPE == "agc"
    leps = load_config(os.path.join(MATRIX_DIR, name), ["MODEL.D2NORMS.NORM", "FRN_LEPS"])
    assert {leps.MODEL[k].NORM for k in ("RESNETS", "FPN", "ROI_BOX_HEAD", "ROI_MASK_HEAD")} == \
        {"FRN_LEPS"} and leps.MODEL.RPN.NORM == ""
    from d2_norms.layers import UnknownNormError

    with pytest.raises(UnknownNormError, match=r"MODEL.D2NORMS.NORM='gnws'.*did you mean 'GNWS'"):
        load_config(os.path.join(MATRIX_DIR, name), ["MODEL.D2NORMS.NORM", "gnws"])


def test_frn_table6_cells_use_per_level_head_norms():
    """Item 7: every FRN Table 6 cell (BN, GN, FRN) sets MODEL.RETINANET.NORM_PER_LEVEL True."""
    assert recipes.RETINANET_NORM_PER_LEVEL is True
    for cell in recipes.PAPER_TABLES["frn-table6"]:
        cfg = _cfg(os.path.join(MATRIX_DIR, recipes.config_name(*cell)))
        assert cfg.MODEL.RETINANET.NORM_PER_LEVEL is True, cell


def test_frn_base_lr_sweep_has_distinct_files():
    """Item 5: the three base lrs of FRN sec. 4.3 are three files per RetinaNet cell."""
    names = {lr: recipes.config_name("retinanet", 101, "FRN", 4, "3x", lr)
             for lr in recipes.FRN_BASE_LRS}
    assert names == {0.01: "retinanet_R_101_FPN_FRN_4img_lr0.01.yaml",
                     0.05: "retinanet_R_101_FPN_FRN_4img.yaml",
                     0.1: "retinanet_R_101_FPN_FRN_4img_lr0.1.yaml"}
    lrs = {lr: _cfg(os.path.join(MATRIX_DIR, n)).SOLVER.BASE_LR for lr, n in names.items()}
    for lr, value in lrs.items():
        assert value == pytest.approx(lr * 32 / 64)  # total batch 32
    with pytest.raises(ValueError, match="RetinaNet"):
        recipes.config_name("mask_rcnn", 50, "GN", 2, "3x", 0.1)


@pytest.mark.parametrize("world_size", [1, 2, 16])
def test_auto_scaling_keeps_per_gpu_batch_and_follows_the_rule(world_size):
    """Detectron2's REFERENCE_WORLD_SIZE scaling of a generated file equals the rule evaluated
    at the new total batch."""
    from d2_norms.engine import Trainer

    for detector, ims in [("retinanet", 2), ("mask_rcnn", 1)]:
        name = recipes.config_name(detector, 50, "GN", ims)
        cfg = Trainer.auto_scale_workers(_cfg(os.path.join(MATRIX_DIR, name)), world_size)
        M = ims * world_size
        rule = (recipes.frn_retinanet_schedule(M) if detector == "retinanet"
                else recipes.gn_mask_rcnn_schedule(M))
        assert cfg.SOLVER.IMS_PER_BATCH == M
        assert cfg.SOLVER.MAX_ITER == rule.max_iter
        assert cfg.SOLVER.BASE_LR == pytest.approx(rule.base_lr)
        assert tuple(cfg.SOLVER.STEPS) == rule.steps
        assert cfg.SOLVER.WARMUP_ITERS == rule.warmup_iters
        assert abs(cfg.SOLVER.CHECKPOINT_PERIOD - rule.checkpoint_period) <= 1


def test_cosine_warmup_follows_half_cosine_then_cosine_decay():
    from detectron2.config import get_cfg

    from d2_norms.solver import build_lr_scheduler

    cfg = get_cfg()
    cfg.SOLVER.BASE_LR, cfg.SOLVER.MAX_ITER = 0.1, 1000
    cfg.SOLVER.LR_SCHEDULER_NAME, cfg.SOLVER.WARMUP_METHOD = "WarmupCosineLR", "cosine"
    cfg.SOLVER.WARMUP_ITERS, cfg.SOLVER.WARMUP_FACTOR = 100, 0.0
    param = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([param], lr=0.1)
    sched = build_lr_scheduler(cfg, opt)
    lrs = []
    for _ in range(1000):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    main = lambda t: 0.1 * 0.5 * (1 + math.cos(math.pi * t / 1000))  # noqa: E731
    for it in (0, 25, 50, 99):
        ramp = main(100) * 0.5 * (1 - math.cos(math.pi * it / 100))
        assert lrs[it] == pytest.approx(ramp, abs=1e-9)
    for it in (100, 500, 999):
        assert lrs[it] == pytest.approx(main(it), rel=1e-6)


@pytest.mark.parametrize("table,runs", [("frn-table6", 27), ("gn-table7", 2)])
def test_reproduce_paper_table_commands(table, runs):
    out = subprocess.run([sys.executable, os.path.join(REPO, "tools", "reproduce.py"), table,
                          "--dry-run", "--num-gpus", "8"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    train = [line for line in out.stdout.splitlines() if "train_net.py" in line]
    assert len(train) == runs
    configs = []
    for line in train:
        config = line.split("--config-file ")[1].split()[0]
        assert os.path.isfile(config)
        assert "--num-gpus 8" in line
        configs.append(os.path.basename(config))
    assert len(set(configs)) == runs  # the lr sweep does not overwrite one file
    if table == "frn-table6":
        assert sum(c.endswith("_lr0.01.yaml") for c in configs) == 9
        assert sum(c.endswith("_lr0.1.yaml") for c in configs) == 9
    assert "ap_table.py --paper" in out.stdout


def test_every_matrix_cell_is_one_recipe_override_of_the_lazy_configs():
    """configs/lazy/COCO-scratch/*.py select a cell with recipe.norm / recipe.ims_per_gpu /
    recipe.frn_base_lr / recipe.length: for every generated yacs cell the recipe values equal
    the file's (norms, batch, lr, decay, schedule, periods, AGC, PreciseBN)."""
    from d2_norms.engine.preflight import load_config
    from d2_norms.lazy.recipe import recipe_values

    cells = list(recipes.matrix_cells())
    assert len(cells) == 216
    for detector, depth, norm, ims, length, lr in cells:
        name = recipes.config_name(detector, depth, norm, ims, length, lr)
        data = load_config(os.path.join(MATRIX_DIR, name), [])
        recipe = {"detector": detector, "norm": norm, "ims_per_gpu": ims, "length": length}
        if lr is not None:
            recipe["frn_base_lr"] = lr
        v = recipe_values(recipe)
        model, solver = data["MODEL"], data["SOLVER"]
        norms = {"backbone_norm": model["RESNETS"]["NORM"], "fpn_norm": model["FPN"]["NORM"],
                 "head_norm": model.get("RETINANET", {}).get("NORM", ""),
                 "rpn_norm": model.get("RPN", {}).get("NORM", ""),
                 "box_head_norm": model.get("ROI_BOX_HEAD", {}).get("NORM", ""),
                 "mask_head_norm": model.get("ROI_MASK_HEAD", {}).get("NORM", "")}
        assert {k: v[k] for k in norms} == norms, name
        assert v["head_norm_per_level"] == model.get("RETINANET", {}).get("NORM_PER_LEVEL",
                                                                          False), name
        assert (v["total_batch"], v["max_iter"], tuple(v["steps"]), v["warmup_iters"],
                v["weight_decay"], v["momentum"], v["checkpoint_period"], v["eval_period"]) == (
            solver["IMS_PER_BATCH"], solver["MAX_ITER"], tuple(solver["STEPS"]),
            solver["WARMUP_ITERS"], solver["WEIGHT_DECAY"], solver["MOMENTUM"],
            solver["CHECKPOINT_PERIOD"], data["TEST"]["EVAL_PERIOD"]), name
        assert v["lr"] == pytest.approx(solver["BASE_LR"], rel=1e-9), name
        assert (v["lr_scheduler_name"], v["warmup_method"]) == (
            solver["LR_SCHEDULER_NAME"], solver["WARMUP_METHOD"]), name
        clip = solver.get("CLIP_GRADIENTS", {})
        assert v["agc_clipping"] == (clip["CLIP_VALUE"] if clip.get("CLIP_TYPE") == "agc"
                                     else None), name
        assert v["precise_bn"] == data["TEST"].get("PRECISE_BN", {}).get("ENABLED", False), name


def test_a_cell_merged_without_load_config_is_refused_not_built_differently():
    """cfg.merge_from_file leaves MODEL.D2NORMS.NORM unapplied (the per-part keys keep
    detectron2's defaults): the builders refuse it instead of building FrozenBN / no-norm
    parts; load_config's config (and its clones) build."""
    from detectron2.config import get_cfg
    from detectron2.modeling import build_model

    from d2_norms.config import add_d2_norms_config
    from d2_norms.engine.errors import ConfigKeyError
    from d2_norms.engine.preflight import load_config

    path = os.path.join(MATRIX_DIR, "retinanet_R_50_FPN_GN_2img.yaml")
    merged = add_d2_norms_config(get_cfg())
    merged.merge_from_file(path)
    merged.MODEL.DEVICE = "meta"
    with pytest.raises(ConfigKeyError, match=r"MODEL.D2NORMS.NORM='GN'.*not applied.*load_config"):
        with torch.device("meta"):
            build_model(merged)
    applied = load_config(path, ["MODEL.DEVICE", "meta"]).clone()
    applied.freeze()
    with torch.device("meta"):
        model = build_model(applied)
    assert any(type(m).__name__ == "GroupNorm" for m in model.backbone.bottom_up.stem.modules())
