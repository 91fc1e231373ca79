"""Generated COCO ground truth + detections, for backend equivalence tests and the eval benchmark.

A case looks like a detector's output on a COCO-like set: ground-truth objects of all three area
ranges (small / medium / large), a few crowd regions, and per image a fixed number of detections:
noisy copies of the ground truth (some with the wrong class) plus random false positives, with
continuous scores. Objects are ellipses inscribed in their boxes, so masks and boxes differ and
segm AP is not bbox AP. Everything is seeded and vectorised per image (5k x 100 in seconds).

Test-fixture code, not part of the d2_norms package: the tests import it as ``coco_cases``
(pytest puts ``tests/`` on ``sys.path``), ``tools/benchmark_eval.py`` adds ``tests/`` itself.
"""
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import numpy as np

ELLIPSE_VERTICES = 16


def _ellipse_polygon(x0: float, y0: float, w: float, h: float) -> List[float]:
    t = np.linspace(0.0, 2.0 * np.pi, ELLIPSE_VERTICES, endpoint=False)
    xs = x0 + w / 2.0 + (w / 2.0) * np.cos(t)
    ys = y0 + h / 2.0 + (h / 2.0) * np.sin(t)
    return np.stack([xs, ys], axis=1).reshape(-1).round(2).tolist()


def _polygon_area(poly: List[float]) -> float:
    xy = np.asarray(poly, dtype=np.float64).reshape(-1, 2)
    x, y = xy[:, 0], xy[:, 1]
    return float(0.5 * abs(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))))


@dataclass
class ImageDetections:
    """Detections of one image: boxes XYXY (absolute pixels), scores, dataset category ids."""

    image_id: int
    height: int
    width: int
    boxes_xyxy: np.ndarray
    scores: np.ndarray
    category_ids: np.ndarray
    masks: Optional[np.ndarray] = None  # (N, H, W) bool; None: ellipses inscribed in the boxes


@dataclass
class SyntheticCase:
    gt: Dict  # COCO annotation dict (images, annotations, categories)
    detections: List[ImageDetections] = field(default_factory=list)
    with_masks: bool = False

    def mask_rles(self, det: ImageDetections) -> List[dict]:
        """Compressed RLE (counts as str) of the ellipse inscribed in each detection box."""
        from pycocotools import mask as mask_util

        if det.masks is not None:
            if len(det.masks) == 0:
                return []
            stack = det.masks.transpose(1, 2, 0).astype(np.uint8)
            rles = mask_util.encode(np.asfortranarray(stack))
            for rle in rles:
                rle["counts"] = rle["counts"].decode("ascii")
            return rles
        rles = []
        for (x0, y0, x1, y1) in det.boxes_xyxy.tolist():
            poly = _ellipse_polygon(x0, y0, x1 - x0, y1 - y0)
            rle = mask_util.merge(mask_util.frPyObjects([poly], det.height, det.width))
            rle["counts"] = rle["counts"].decode("ascii")
            rles.append(rle)
        return rles

    def coco_results(self) -> List[dict]:
        """The detections in COCO result format (bbox XYWH; RLE segmentation when with_masks)."""
        out = []
        for det in self.detections:
            xywh = det.boxes_xyxy.copy()
            xywh[:, 2:] -= xywh[:, :2]
            rles = self.mask_rles(det) if self.with_masks else None
            for i, (box, score, cat) in enumerate(
                zip(xywh.tolist(), det.scores.tolist(), det.category_ids.tolist())
            ):
                r = {"image_id": det.image_id, "category_id": cat, "bbox": box, "score": score}
                if rles is not None:
                    r["segmentation"] = rles[i]
                out.append(r)
        return out


def make_coco_case(
    num_images: int,
    detections_per_image: int = 100,
    *,
    num_categories: int = 8,
    with_masks: bool = False,
    seed: int = 0,
    image_size=(480, 640),
    objects_per_image: float = 7.0,
    crowd_fraction: float = 0.03,
    first_category_id: int = 1,
) -> SyntheticCase:
    """Generate ``num_images`` images of ground truth and ``detections_per_image`` detections each.

    Category ids are ``first_category_id .. first_category_id + num_categories - 1`` (COCO's ids
    start at 1 and are not contiguous in general; set first_category_id to test the mapping).
    """
    if num_images < 1 or detections_per_image < 0:
        raise ValueError("num_images must be >= 1 and detections_per_image >= 0")
    rng = np.random.default_rng(seed)
    height, width = image_size
    cat_ids = np.arange(first_category_id, first_category_id + num_categories)
    gt = {
        "info": {"description": "d2_norms synthetic evaluation case", "seed": seed},
        "images": [],
        "annotations": [],
        "categories": [{"id": int(c), "name": f"class_{int(c)}", "supercategory": "shape"}
                       for c in cat_ids],
    }
    case = SyntheticCase(gt=gt, with_masks=with_masks)
    ann_id = 1
    for img_idx in range(num_images):
        image_id = img_idx + 1
        gt["images"].append(
            {"id": image_id, "height": height, "width": width, "file_name": f"{image_id:06d}.png"}
        )
        n_obj = max(1, int(rng.poisson(objects_per_image)))
        # Side lengths log-uniform in [6, 300] px: areas span small (< 32^2), medium and large
        # (> 96^2).
        sides = np.exp(rng.uniform(np.log(6.0), np.log(300.0), size=(n_obj, 1)))
        aspect = np.exp(rng.uniform(-0.5, 0.5, size=(n_obj, 1)))
        wh = np.concatenate([sides * aspect, sides / aspect], axis=1)
        wh = np.minimum(wh, [width - 2.0, height - 2.0])
        xy = rng.uniform(0, 1, size=(n_obj, 2)) * ([width, height] - wh)
        gt_cats = rng.choice(cat_ids, size=n_obj)
        crowd = rng.uniform(size=n_obj) < crowd_fraction
        for k in range(n_obj):
            x0, y0 = xy[k].round(2)
            w, h = wh[k].round(2)
            poly = _ellipse_polygon(x0, y0, w, h)
            gt["annotations"].append({
                "id": ann_id, "image_id": image_id, "category_id": int(gt_cats[k]),
                "bbox": [float(x0), float(y0), float(w), float(h)],
                "segmentation": [poly], "area": _polygon_area(poly), "iscrowd": int(crowd[k]),
            })
            ann_id += 1

        n_det = detections_per_image
        # About 60% of the detections are noisy copies of ground truth, the rest background.
        n_near = min(n_det, int(round(0.6 * n_det)))
        src = rng.integers(0, n_obj, size=n_near)
        jitter = rng.normal(0.0, 0.12, size=(n_near, 4)) * np.concatenate([wh[src], wh[src]], 1)
        near = np.concatenate([xy[src], xy[src] + wh[src]], axis=1) + jitter
        near_cats = np.where(rng.uniform(size=n_near) < 0.85, gt_cats[src],
                             rng.choice(cat_ids, size=n_near))
        near_scores = rng.beta(5.0, 2.0, size=n_near)
        n_bg = n_det - n_near
        bg_wh = np.exp(rng.uniform(np.log(6.0), np.log(250.0), size=(n_bg, 2)))
        bg_xy = rng.uniform(0, 1, size=(n_bg, 2)) * np.maximum([width, height] - bg_wh, 1.0)
        bg = np.concatenate([bg_xy, bg_xy + bg_wh], axis=1)
        boxes = np.concatenate([near, bg], axis=0)
        boxes[:, 0::2] = boxes[:, 0::2].clip(0, width)
        boxes[:, 1::2] = boxes[:, 1::2].clip(0, height)
        # Keep boxes non-degenerate (at least 1 px) after clipping.
        boxes[:, 2] = np.maximum(boxes[:, 2], np.minimum(boxes[:, 0] + 1.0, width))
        boxes[:, 0] = np.minimum(boxes[:, 0], boxes[:, 2] - 1.0)
        boxes[:, 3] = np.maximum(boxes[:, 3], np.minimum(boxes[:, 1] + 1.0, height))
        boxes[:, 1] = np.minimum(boxes[:, 1], boxes[:, 3] - 1.0)
        scores = np.concatenate([near_scores, rng.beta(2.0, 5.0, size=n_bg)])
        cats = np.concatenate([near_cats, rng.choice(cat_ids, size=n_bg)])
        order = np.argsort(-scores, kind="stable")
        case.detections.append(ImageDetections(
            image_id=image_id, height=height, width=width,
            boxes_xyxy=boxes[order].astype(np.float32), scores=scores[order].astype(np.float32),
            category_ids=cats[order].astype(np.int64),
        ))
    return case


def to_instances(det: ImageDetections, contiguous_id: Dict[int, int],
                 case: Optional[SyntheticCase] = None):
    """A detectron2 ``Instances`` (model output format) for one image's detections.

    ``contiguous_id`` maps dataset category ids to the model's 0..K-1 class indices. With a case
    that has masks, ``pred_masks`` holds the dense masks (decoded from the RLEs).
    """
    import torch
    from detectron2.structures import Boxes, Instances

    inst = Instances((det.height, det.width))
    inst.pred_boxes = Boxes(torch.from_numpy(det.boxes_xyxy))
    inst.scores = torch.from_numpy(det.scores)
    inst.pred_classes = torch.tensor([contiguous_id[int(c)] for c in det.category_ids],
                                     dtype=torch.int64)
    if det.masks is not None:
        inst.pred_masks = torch.from_numpy(det.masks.astype(bool))
    elif case is not None and case.with_masks:
        from pycocotools import mask as mask_util

        rles = case.mask_rles(det)
        if rles:
            masks = mask_util.decode([dict(r, counts=r["counts"].encode("ascii")) for r in rles])
            inst.pred_masks = torch.from_numpy(masks.transpose(2, 0, 1).astype(bool))
        else:
            inst.pred_masks = torch.zeros((0, det.height, det.width), dtype=torch.bool)
    return inst


def predictions_from_ground_truth(gt: Dict, detections_per_image: int = 20, *, seed: int = 0,
                                  max_shift: float = 0.15) -> SyntheticCase:
    """Detections with masks for an existing COCO ground truth (e.g. the synthetic shapes val).

    Each object gets one or two copies of its mask shifted by up to ``max_shift`` of its size
    (15% of them with a wrong class), the rest of the image budget is filled with rectangular
    false positives; boxes are the tight boxes of the masks. Crowd regions get no copies.
    """
    from pycocotools.coco import COCO
    import contextlib
    import io

    rng = np.random.default_rng(seed)
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO()
        coco.dataset = gt
        coco.createIndex()
    cat_ids = np.array(sorted(coco.getCatIds()))
    case = SyntheticCase(gt=gt, with_masks=True)
    for img in gt["images"]:
        h, w = img["height"], img["width"]
        masks, scores, cats = [], [], []
        for ann in coco.loadAnns(coco.getAnnIds(imgIds=[img["id"]])):
            if ann.get("iscrowd", 0):
                continue
            mask = coco.annToMask(ann).astype(bool)
            bw, bh = ann["bbox"][2], ann["bbox"][3]
            for _ in range(int(rng.integers(1, 3))):
                dx = int(round(rng.uniform(-max_shift, max_shift) * bw))
                dy = int(round(rng.uniform(-max_shift, max_shift) * bh))
                shifted = np.zeros_like(mask)
                ys, xs = np.nonzero(mask)
                ys, xs = ys + dy, xs + dx
                keep = (ys >= 0) & (ys < h) & (xs >= 0) & (xs < w)
                shifted[ys[keep], xs[keep]] = True
                if not shifted.any():
                    continue
                masks.append(shifted)
                scores.append(rng.beta(5.0, 2.0))
                right = rng.uniform() < 0.85
                cats.append(ann["category_id"] if right else int(rng.choice(cat_ids)))
        masks, scores, cats = masks[:detections_per_image], scores[:detections_per_image], \
            cats[:detections_per_image]
        while len(masks) < detections_per_image:
            bw, bh = rng.integers(3, max(4, w // 2)), rng.integers(3, max(4, h // 2))
            x0, y0 = rng.integers(0, w - bw), rng.integers(0, h - bh)
            m = np.zeros((h, w), dtype=bool)
            m[y0:y0 + bh, x0:x0 + bw] = True
            masks.append(m)
            scores.append(rng.beta(2.0, 5.0))
            cats.append(int(rng.choice(cat_ids)))
        stack = np.stack(masks) if masks else np.zeros((0, h, w), dtype=bool)
        boxes = np.zeros((len(masks), 4), dtype=np.float32)
        for i, m in enumerate(masks):
            ys, xs = np.nonzero(m)
            boxes[i] = (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
        order = np.argsort(-np.asarray(scores), kind="stable")
        case.detections.append(ImageDetections(
            image_id=img["id"], height=h, width=w, boxes_xyxy=boxes[order],
            scores=np.asarray(scores, dtype=np.float32)[order],
            category_ids=np.asarray(cats, dtype=np.int64)[order], masks=stack[order]))
    return case


def register_case(case: SyntheticCase, name: str, directory: str) -> str:
    """Register the case's ground truth as a COCO-format detectron2 dataset ``name``.

    Writes ``directory/<name>.json`` and sets the metadata that ``load_coco_json`` would
    (thing_classes, thing_dataset_id_to_contiguous_id). Re-registering a name replaces it.
    Returns the JSON path.
    """
    import json
    import os

    from detectron2.data import DatasetCatalog, MetadataCatalog
    from detectron2.data.datasets import register_coco_instances

    os.makedirs(directory, exist_ok=True)
    json_file = os.path.join(directory, f"{name}.json")
    with open(json_file, "w") as f:
        json.dump(case.gt, f)
    if name in DatasetCatalog.list():
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)
    register_coco_instances(name, {}, json_file, directory)
    cat_ids = sorted(c["id"] for c in case.gt["categories"])
    MetadataCatalog.get(name).set(
        thing_classes=[f"class_{c}" for c in cat_ids],
        thing_dataset_id_to_contiguous_id={c: i for i, c in enumerate(cat_ids)},
    )
    return json_file
