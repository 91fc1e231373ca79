"""COCO AP backends: faster-coco-eval must reproduce pycocotools (the reference) to 1e-4."""
import copy
import math

import numpy as np
import pytest

import d2_norms  # noqa: F401
from d2_norms.evaluation.backends import (
    BACKENDS,
    COCO_METRICS,
    evaluate_coco_results,
    load_coco_gt,
    per_category_ap,
    resolve_backend,
    summarize_precision,
)

from coco_cases import make_coco_case  # tests/coco_cases.py

pytest.importorskip("faster_coco_eval")
pytest.importorskip("pycocotools")

ATOL = 1e-4  # on COCO's 0-100 scale


def _both(case_gt, results, iou_type, **kw):
    out = {}
    for backend in BACKENDS:
        gt = load_coco_gt(case_gt, backend)
        out[backend] = evaluate_coco_results(gt, results, iou_type, backend, **kw)
    return out["faster_coco_eval"], out["pycocotools"]


def _assert_same(a, b):
    for m in COCO_METRICS:
        x, y = a.metrics[m], b.metrics[m]
        assert math.isfinite(x) and math.isfinite(y), (m, x, y)
        assert abs(x - y) <= ATOL, f"{a.iou_type} {m}: faster {x} vs pycocotools {y}"


@pytest.fixture(scope="module")
def mask_case():
    # Non-contiguous category ids (5..16), crowd regions, objects of every area range.
    case = make_coco_case(120, 60, num_categories=12, with_masks=True, seed=7,
                          first_category_id=5, crowd_fraction=0.05)
    return case, case.coco_results()


@pytest.fixture(scope="module")
def mask_case_outputs(mask_case):
    case, results = mask_case
    return {iou_type: _both(case.gt, results, iou_type) for iou_type in ("bbox", "segm")}


@pytest.mark.parametrize("iou_type", ["bbox", "segm"])
def test_backends_agree_on_masks_and_boxes(mask_case_outputs, iou_type):
    fast, ref = mask_case_outputs[iou_type]
    _assert_same(fast, ref)
    # Non-trivial numbers in every area range, so a backend ignoring one could not pass.
    for m in COCO_METRICS:
        assert 1.0 < ref.metrics[m] < 99.0, (m, ref.metrics[m])
    np.testing.assert_allclose(fast.precision, ref.precision, atol=1e-6)


def test_segm_differs_from_bbox(mask_case_outputs):
    """Masks are ellipses in their boxes: mask AP must not collapse onto box AP."""
    _, box = mask_case_outputs["bbox"]
    _, seg = mask_case_outputs["segm"]
    assert abs(box.metrics["AP"] - seg.metrics["AP"]) > 0.05


def test_backends_agree_on_large_generated_set():
    """COCO-like: 80 categories, 100 detections per image, 300 images (30k detections)."""
    case = make_coco_case(300, 100, num_categories=80, seed=11)
    fast, ref = _both(case.gt, case.coco_results(), "bbox")
    _assert_same(fast, ref)
    cats_fast, cats_ref = per_category_ap(fast), per_category_ap(ref)
    assert cats_fast.keys() == cats_ref.keys() and len(cats_ref) == 80
    for k in cats_ref:
        assert (math.isnan(cats_fast[k]) and math.isnan(cats_ref[k])) or \
            abs(cats_fast[k] - cats_ref[k]) <= ATOL


def test_summary_matches_pycocotools_own_stats(mask_case):
    """Our reduction of the precision array equals COCOeval.summarize() of the reference."""
    import contextlib
    import io

    from pycocotools.cocoeval import COCOeval

    case, results = mask_case
    for iou_type in ("bbox", "segm"):
        gt = load_coco_gt(case.gt, "pycocotools")
        task = [dict(r) for r in results]
        if iou_type == "segm":
            for r in task:
                r.pop("bbox")
        with contextlib.redirect_stdout(io.StringIO()):
            ev = COCOeval(gt, gt.loadRes(task), iou_type)
            ev.evaluate()
            ev.accumulate()
            ev.summarize()
        ours = summarize_precision(np.asarray(ev.eval["precision"]), ev.params)
        for i, m in enumerate(COCO_METRICS):
            assert abs(ours[m] - ev.stats[i] * 100) <= 1e-9, (iou_type, m)


def test_custom_max_dets_both_backends(mask_case, mask_case_outputs):
    case, results = mask_case
    fast, ref = _both(case.gt, results, "bbox", max_dets=(1, 10, 20))
    _assert_same(fast, ref)
    _, ref100 = mask_case_outputs["bbox"]
    assert ref.metrics["AP"] != pytest.approx(ref100.metrics["AP"], abs=1e-6)


def test_results_are_not_modified(mask_case):
    case, results = mask_case
    before = copy.deepcopy(results[:50])
    for backend in BACKENDS:
        gt = load_coco_gt(case.gt, backend)
        for iou_type in ("bbox", "segm"):
            evaluate_coco_results(gt, results, iou_type, backend)
    assert results[:50] == before


def test_image_subset(mask_case, mask_case_outputs):
    case, results = mask_case
    ids = [img["id"] for img in case.gt["images"]][:30]
    fast, ref = _both(case.gt, results, "bbox", img_ids=ids)
    _assert_same(fast, ref)
    _, full = mask_case_outputs["bbox"]
    assert ref.metrics["AP"] != pytest.approx(full.metrics["AP"], abs=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_results_give_nan(backend):
    case = make_coco_case(3, 5, seed=1)
    out = evaluate_coco_results(load_coco_gt(case.gt, backend), [], "bbox", backend)
    assert all(math.isnan(out.metrics[m]) for m in COCO_METRICS)


@pytest.mark.parametrize("backend", BACKENDS)
def test_predictions_for_unknown_images_are_rejected(backend):
    case = make_coco_case(3, 5, seed=1)
    results = case.coco_results()
    results[0] = dict(results[0], image_id=999)
    with pytest.raises(ValueError, match="not in the ground truth"):
        evaluate_coco_results(load_coco_gt(case.gt, backend), results, "bbox", backend)


def test_segm_without_masks_is_a_clear_error():
    case = make_coco_case(3, 5, seed=1)
    with pytest.raises(ValueError, match="segmentation"):
        evaluate_coco_results(load_coco_gt(case.gt, "pycocotools"), case.coco_results(), "segm",
                              "pycocotools")


def test_resolve_backend():
    assert resolve_backend("auto") == "faster_coco_eval"
    assert resolve_backend("pycocotools") == "pycocotools"
    with pytest.raises(ValueError, match="unknown COCO evaluation backend"):
        resolve_backend("detectron2_fast")
