#!/usr/bin/env python
"""`make demo`: train a small from-scratch detector with a batch-independent normalizer on the
synthetic shapes set (CPU is enough), evaluate it, print the AP table and where outputs went.

    python tools/demo.py [--config-file configs/synthetic/...yaml] [--output-dir DIR] [KEY VALUE ...]

It also draws the trained model's predictions (boxes and masks, detectron2's Visualizer) on a few
validation images next to their ground truth: OUTPUT_DIR/predictions.png, path printed.
"""
import argparse
import json
import os
import sys
import time

import numpy as np

import d2_norms  # noqa: F401
from d2_norms.engine.defaults import argument_parser, main, setup_cfg

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_CONFIG = os.path.join(REPO, "configs", "synthetic", "demo_mask_rcnn_R18_FPN_GN.yaml")
LEARNED_AP50 = 50.0  # the bar for "the model really learned" on the synthetic val
PICTURE_FILE = "predictions.png"
PICTURE_IMAGES = 4  # validation images in the picture (rows)
PICTURE_SCALE = 3  # 128 px images drawn at 384 px
PICTURE_SCORE = 0.5  # predictions drawn: score >= this
PICTURE_HEADER = 28  # px of the title strip above the two columns


def format_table(results) -> str:
    keys = ["AP", "AP50", "AP75", "APs", "APm", "APl"]
    lines = ["| task | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
    for task in ("bbox", "segm"):
        if task in results:
            row = [f"{results[task].get(k, float('nan')):.1f}" for k in keys]
            lines.append(f"| {task} | " + " | ".join(row) + " |")
    return "\n".join(lines)


def picture_size(image_hw, num_images: int, scale: int = PICTURE_SCALE):
    """(height, width) of the picture of ``num_images`` images of ``image_hw`` px: a title strip,
    then one row per image: ground truth | predictions, each drawn ``scale`` times larger."""
    h, w = image_hw
    return PICTURE_HEADER + num_images * h * scale, 2 * w * scale


def _predict(cfg, model, image_bgr):
    """Instances for one BGR image, as detectron2's DefaultPredictor computes them."""
    import torch
    from detectron2.data import transforms as T

    aug = T.ResizeShortestEdge([cfg.INPUT.MIN_SIZE_TEST] * 2, cfg.INPUT.MAX_SIZE_TEST)
    image = image_bgr if cfg.INPUT.FORMAT == "BGR" else image_bgr[:, :, ::-1]
    height, width = image.shape[:2]
    resized = aug.get_transform(image).apply_image(image)
    tensor = torch.as_tensor(resized.astype("float32").transpose(2, 0, 1))
    with torch.no_grad():
        return model([{"image": tensor, "height": height, "width": width}])[0]["instances"]


def draw_predictions(cfg, model, dataset_name: str, out_path: str, *,
                     num_images: int = PICTURE_IMAGES, score_threshold: float = PICTURE_SCORE,
                     scale: int = PICTURE_SCALE) -> str:
    """Draw ``model``'s predictions (boxes, classes, scores, masks; score >= ``score_threshold``)
    on the first ``num_images`` images of ``dataset_name`` that hold objects, next to their
    ground truth, with detectron2's Visualizer; write the PNG to ``out_path``; return the path.
    Every panel is the image ``scale`` times larger; size: :func:`picture_size`."""
    import cv2
    from detectron2.data import DatasetCatalog, MetadataCatalog
    from detectron2.data.detection_utils import read_image
    from detectron2.utils.visualizer import Visualizer

    dicts = [d for d in DatasetCatalog.get(dataset_name) if d.get("annotations")][:num_images]
    if not dicts:
        raise ValueError(f"{dataset_name} has no image with objects to draw")
    metadata = MetadataCatalog.get(dataset_name)
    was_training = model.training
    model.eval()
    rows = []
    try:
        for d in dicts:
            bgr = read_image(d["file_name"], format="BGR")
            rgb = bgr[:, :, ::-1]
            h, w = rgb.shape[:2]
            truth = Visualizer(rgb, metadata, scale=scale).draw_dataset_dict(d).get_image()
            instances = _predict(cfg, model, bgr).to("cpu")
            instances = instances[instances.scores >= score_threshold]
            pred = Visualizer(rgb, metadata, scale=scale).draw_instance_predictions(
                instances).get_image()
            size = (w * scale, h * scale)  # matplotlib may round a pixel off: exact size
            rows.append(np.concatenate([cv2.resize(truth, size), cv2.resize(pred, size)], 1))
    finally:
        model.train(was_training)
    width = max(r.shape[1] for r in rows)
    rows = [np.pad(r, ((0, 0), (0, width - r.shape[1]), (0, 0)), constant_values=255)
            for r in rows]
    header = np.full((PICTURE_HEADER, width, 3), 255, dtype=np.uint8)
    titles = ((0, "ground truth"), (width // 2, f"predictions (score >= {score_threshold:g})"))
    for x, text in titles:
        cv2.putText(header, text, (x + 6, PICTURE_HEADER - 9), cv2.FONT_HERSHEY_SIMPLEX, 0.55,
                    (0, 0, 0), 1, cv2.LINE_AA)
    picture = np.concatenate([header] + rows, 0)
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    if not cv2.imwrite(out_path, np.ascontiguousarray(picture[:, :, ::-1])):
        raise OSError(f"could not write {out_path}")
    return out_path


def predictions_picture(cfg, weights: str, out_path: str, **kwargs) -> str:
    """:func:`draw_predictions` of the model of ``cfg`` with ``weights``, on cfg's first test
    set."""
    from detectron2.checkpoint import DetectionCheckpointer

    from d2_norms.engine.trainer import Trainer

    model = Trainer.build_model(cfg)
    DetectionCheckpointer(model).load(weights)
    return draw_predictions(cfg, model, cfg.DATASETS.TEST[0], out_path, **kwargs)


def run(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config-file", default=DEFAULT_CONFIG)
    parser.add_argument("--output-dir", default=None,
                        help="default: output/demo/<timestamp> in the repository")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides KEY VALUE ...")
    args = parser.parse_args(argv)
    output_dir = args.output_dir or os.path.join(REPO, "output", "demo",
                                                 time.strftime("%Y%m%d-%H%M%S"))
    train_args = argument_parser().parse_args(
        ["--config-file", args.config_file, "OUTPUT_DIR", output_dir] + args.opts)
    start = time.perf_counter()
    results = main(train_args)
    minutes = (time.perf_counter() - start) / 60
    print("\n=== d2_norms demo ===")
    print(f"config:  {os.path.relpath(args.config_file, REPO)}")
    print(f"time:    {minutes:.1f} min (training + evaluation)")
    print(format_table(results))
    ap50 = results.get("bbox", {}).get("AP50", 0.0)
    verdict = "learned" if ap50 >= LEARNED_AP50 else f"did NOT reach box AP50 {LEARNED_AP50:.0f}"
    print(f"box AP50 {ap50:.1f}: {verdict}")
    print(f"outputs: {output_dir}")
    print("  config.yaml (full config), metrics.json (losses, lr, per iteration),")
    print("  events.out.tfevents.* (TensorBoard: tensorboard --logdir output/demo),")
    print("  model_final.pth (weights), results.json (AP numbers), inference/ (COCO predictions)")
    picture = None
    try:
        picture = predictions_picture(setup_cfg(train_args, log=False),
                                      os.path.join(output_dir, "model_final.pth"),
                                      os.path.join(output_dir, PICTURE_FILE))
        print(f"picture: {picture}")
        print("  validation images: ground truth (left) | predictions, score >= "
              f"{PICTURE_SCORE:g} (right)")
    except Exception as e:  # the picture is an extra: the verdict and exit code stay the AP's
        print(f"picture: not drawn: {type(e).__name__}: {e}", file=sys.stderr)
    with open(os.path.join(output_dir, "demo_summary.json"), "w") as f:
        json.dump({"minutes": minutes, "results": results, "picture": picture}, f, indent=2)
    return 0 if ap50 >= LEARNED_AP50 else 1


if __name__ == "__main__":
    sys.exit(run())
