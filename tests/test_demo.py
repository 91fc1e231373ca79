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


def test_demo_picture_is_a_png_of_the_expected_size(tmp_path):
    """The picture `make demo` writes, drawn by the demo's own function from a checkpoint of a
    tiny (untrained) model of the demo's config on the tiny set: a PNG of picture_size(), the
    ground-truth column with the annotations drawn on the image."""
    import numpy as np
    import torch
    from detectron2.checkpoint import DetectionCheckpointer
    from detectron2.data import DatasetCatalog
    from detectron2.data.detection_utils import read_image
    from PIL import Image

    from d2_norms.engine.defaults import argument_parser, setup_cfg
    from d2_norms.engine.trainer import Trainer

    cfg = setup_cfg(argument_parser().parse_args(
        ["--config-file", demo.DEFAULT_CONFIG, "DATASETS.TEST", "('synthetic_shapes_tiny_val',)",
         "MODEL.ROI_HEADS.NUM_CLASSES", "3", "INPUT.MIN_SIZE_TEST", "64",
         "INPUT.MAX_SIZE_TEST", "64", "MODEL.DEVICE", "cpu",
         "TEST.DETECTIONS_PER_IMAGE", "3"]), log=False)
    torch.manual_seed(0)
    weights = tmp_path / "model_final.pth"
    DetectionCheckpointer(Trainer.build_model(cfg), save_dir=str(tmp_path)).save("model_final")
    path = demo.predictions_picture(cfg, str(weights), str(tmp_path / "pic" / "p.png"),
                                    num_images=2, scale=2, score_threshold=0.0)
    assert path == str(tmp_path / "pic" / "p.png")
    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    picture = np.asarray(Image.open(path).convert("RGB"))
    assert picture.shape[:2] == demo.picture_size((64, 64), 2, scale=2) == (28 + 2 * 128, 256)
    # the first row's left panel is the first image with objects, drawn over (not bare)
    first = next(d for d in DatasetCatalog.get("synthetic_shapes_tiny_val") if d["annotations"])
    bare = np.kron(read_image(first["file_name"], format="RGB"), np.ones((2, 2, 1)))
    truth = picture[28:28 + 128, :128].astype(float)
    assert truth.shape == bare.shape and np.abs(truth - bare).mean() > 1.0


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
    # the picture of predictions next to ground truth, its path printed
    picture = out / demo.PICTURE_FILE
    assert f"picture: {picture}" in text and summary["picture"] == str(picture)
    assert picture.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
