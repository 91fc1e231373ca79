"""tools/demo.py (`make demo`): its config matches its dataset, and the script runs end to end
(here on the tiny set for a few iterations; the real demo is measured in docs/DESIGN.md)."""
import json
import os
import sys

import pytest

import d2_norms  # noqa: F401
from detectron2.data import MetadataCatalog

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "tools"))
import demo  # noqa: E402


def test_demo_config_trains_on_the_two_class_set_with_matching_heads():
    from d2_norms.engine.defaults import argument_parser, setup_cfg

    args = argument_parser().parse_args(["--config-file", demo.DEFAULT_CONFIG])
    cfg = setup_cfg(args, log=False)
    assert cfg.DATASETS.TRAIN == ("synthetic_shapes_demo_train",)
    assert cfg.DATASETS.TEST == ("synthetic_shapes_demo_val",)
    for name in cfg.DATASETS.TRAIN + cfg.DATASETS.TEST:
        assert len(MetadataCatalog.get(name).thing_classes) == cfg.MODEL.ROI_HEADS.NUM_CLASSES
    # a batch-independent normalizer everywhere, from scratch
    assert cfg.MODEL.WEIGHTS == "" and cfg.MODEL.BACKBONE.FREEZE_AT == 0
    assert {cfg.MODEL.RESNETS.NORM, cfg.MODEL.FPN.NORM, cfg.MODEL.ROI_BOX_HEAD.NORM,
            cfg.MODEL.ROI_MASK_HEAD.NORM} == {"GN"}


def test_format_table_rows_and_missing_values():
    table = demo.format_table({"bbox": {"AP": 43.44, "AP50": 74.8, "APl": float("nan")}})
    lines = table.splitlines()
    assert lines[0] == "| task | AP | AP50 | AP75 | APs | APm | APl |"
    assert lines[2].startswith("| bbox | 43.4 | 74.8 | nan |") and len(lines) == 3


@pytest.mark.slow
def test_demo_script_runs_and_reports_the_verdict(tmp_path, capsys):
    out = tmp_path / "demo"
    code = demo.run(["--output-dir", str(out),
                     "DATASETS.TRAIN", "('synthetic_shapes_tiny_train',)",
                     "DATASETS.TEST", "('synthetic_shapes_tiny_val',)",
                     "MODEL.ROI_HEADS.NUM_CLASSES", "3", "DATALOADER.NUM_WORKERS", "0",
                     "SOLVER.MAX_ITER", "4", "SOLVER.WARMUP_ITERS", "1", "SOLVER.STEPS", "()",
                     "SOLVER.IMS_PER_BATCH", "2", "INPUT.MIN_SIZE_TRAIN", "(64,)",
                     "INPUT.MAX_SIZE_TRAIN", "64", "INPUT.MIN_SIZE_TEST", "64",
                     "INPUT.MAX_SIZE_TEST", "64"])
    text = capsys.readouterr().out
    summary = json.loads((out / "demo_summary.json").read_text())
    ap50 = summary["results"]["bbox"]["AP50"]
    # 4 iterations learn nothing: the script must say so and fail, not claim success
    assert (code == 0) == (ap50 >= demo.LEARNED_AP50)
    assert f"box AP50 {ap50:.1f}" in text and f"outputs: {out}" in text
    assert "| segm |" in text
    assert (out / "model_final.pth").exists() and (out / "results.json").exists()
