"""results.json / run_status.json: schema, atomic writes, run description, clear errors."""
import json
import math
import os

import pytest

import d2_norms  # noqa: F401
from detectron2.config import get_cfg

from d2_norms.evaluation import run_files
from d2_norms.evaluation.run_files import (
    RESULTS_FILE,
    RUN_STATUS_FILE,
    RunFileError,
    describe_run,
    images_per_gpu,
    load_results,
    load_run_status,
    save_results,
    write_run_status,
)

METRICS = {"AP": 31.5, "AP50": 52.25, "AP75": 30.0, "APs": 10.0, "APm": 33.0, "APl": float("nan")}


def _retinanet_cfg(norm="FRN", ims=16, ref=8):
    cfg = get_cfg()
    cfg.MODEL.META_ARCHITECTURE = "RetinaNet"
    cfg.MODEL.BACKBONE.NAME = "build_retinanet_resnet_fpn_backbone"
    cfg.MODEL.RESNETS.DEPTH = 101
    cfg.MODEL.RESNETS.NORM = norm
    cfg.MODEL.FPN.NORM = norm
    cfg.MODEL.RETINANET.NORM = norm
    cfg.SOLVER.IMS_PER_BATCH = ims
    cfg.SOLVER.REFERENCE_WORLD_SIZE = ref
    cfg.DATASETS.TEST = ("coco_2017_val",)
    return cfg


def _mask_cfg(norm="GN", head_norm="GN"):
    cfg = get_cfg()
    cfg.MODEL.META_ARCHITECTURE = "GeneralizedRCNN"
    cfg.MODEL.MASK_ON = True
    cfg.MODEL.BACKBONE.NAME = "build_resnet_fpn_backbone"
    cfg.MODEL.RESNETS.DEPTH = 50
    for key in ("RESNETS", "FPN", "ROI_MASK_HEAD"):
        getattr(cfg.MODEL, key).NORM = norm
    cfg.MODEL.ROI_BOX_HEAD.NORM = head_norm
    cfg.SOLVER.IMS_PER_BATCH = 4
    return cfg


def test_describe_run_retinanet_and_images_per_gpu():
    d = describe_run(_retinanet_cfg("FRN", ims=16, ref=8))
    assert d["detector"] == "RetinaNet" and d["detector_label"] == "RetinaNet R101-FPN"
    assert d["normalizer"] == "FRN"
    assert d["norms"] == {"backbone": "FRN", "fpn": "FRN", "head": "FRN"}
    assert d["images_per_gpu"] == 2 and d["total_batch"] == 16
    # detectron2 rescales IMS_PER_BATCH and REFERENCE_WORLD_SIZE together: same images per GPU
    assert images_per_gpu(_retinanet_cfg(ims=4, ref=2))[0] == 2
    # REFERENCE_WORLD_SIZE 0: split over the actual processes
    assert images_per_gpu(_retinanet_cfg(ims=8, ref=0), world_size=4)[0] == 2
    ipg, source = images_per_gpu(_retinanet_cfg(ims=8, ref=0))
    assert ipg == 8 and "assumed 1 process" in source


def test_describe_run_mask_rcnn_names_differing_parts():
    same = describe_run(_mask_cfg("GN", "GN"))
    assert same["detector_label"] == "Mask R-CNN R50-FPN" and same["normalizer"] == "GN"
    mixed = describe_run(_mask_cfg("FRN", ""))
    assert mixed["normalizer"] == "FRN"
    assert mixed["normalizer_detail"] == "FRN (box_head: none)"
    box_only = _mask_cfg()
    box_only.MODEL.MASK_ON = False
    assert describe_run(box_only)["detector"] == "Faster R-CNN"
    nf = _mask_cfg("", "GN")
    nf.MODEL.BACKBONE.NAME = "build_nf_resnet_fpn_backbone"
    assert describe_run(nf)["normalizer"] == "NF"
    nf_norm = _mask_cfg("NF", "")
    assert describe_run(nf_norm)["normalizer"] == "NF"


def test_save_results_schema(tmp_path):
    cfg = _retinanet_cfg()
    results = {"bbox": dict(METRICS, **{"AP-circle": 40.0})}
    path = save_results(str(tmp_path), results, cfg, iteration=1999, dataset_name="coco_2017_val")
    assert path == str(tmp_path / RESULTS_FILE)
    text = (tmp_path / RESULTS_FILE).read_text()
    assert "NaN" not in text  # strict JSON: NaN written as null
    data = json.loads(text)
    assert data["schema_version"] == 1
    ev = data["evaluations"]["coco_2017_val"]
    assert ev["iteration"] == 1999
    assert ev["metrics"]["bbox"]["AP"] == 31.5 and ev["metrics"]["bbox"]["APl"] is None
    assert ev["per_category_ap"]["bbox"] == {"circle": 40.0}
    assert ev["eval_backend"] == "faster_coco_eval"  # no D2NORMS.EVAL: "auto", resolved
    run = data["run"]
    for key in ("detector", "detector_label", "normalizer", "norms", "images_per_gpu",
                "total_batch", "ims_per_batch", "world_size", "max_iter"):
        assert key in run
    assert run["world_size"] == 1 and run["images_per_gpu"] == 2
    for key in ("python", "torch", "detectron2", "d2_norms", "faster-coco-eval", "pycocotools"):
        assert data["versions"][key], key
    assert data["timestamp"].endswith("+00:00")
    assert load_results(path)["evaluations"]["coco_2017_val"]["metrics"]["bbox"]["AP50"] == 52.25
    assert [p for p in os.listdir(tmp_path) if p.endswith(".tmp")] == []


def test_save_results_merges_datasets_and_replaces_same(tmp_path):
    cfg = _retinanet_cfg()
    save_results(str(tmp_path), {"bbox": METRICS}, cfg, 10, "a_val")
    both = {"a_val": {"bbox": dict(METRICS, AP=1.0)}, "b_val": {"bbox": dict(METRICS, AP=2.0)}}
    save_results(str(tmp_path), both, cfg, 20, "a_val,b_val")
    ev = load_results(str(tmp_path / RESULTS_FILE))["evaluations"]
    assert ev["a_val"]["metrics"]["bbox"]["AP"] == 1.0 and ev["a_val"]["iteration"] == 20
    assert ev["b_val"]["metrics"]["bbox"]["AP"] == 2.0


def test_save_results_rejects_bad_input(tmp_path):
    cfg = _retinanet_cfg()
    with pytest.raises(ValueError, match="no evaluation results"):
        save_results(str(tmp_path), {}, cfg, 1, "a_val")
    with pytest.raises(ValueError, match=r"lacks COCO metric\(s\) \['AP75'"):
        save_results(str(tmp_path), {"bbox": {"AP": 1, "AP50": 2}}, cfg, 1, "a_val")
    with pytest.raises(ValueError, match="datasets"):
        save_results(str(tmp_path), {"x_val": {"bbox": METRICS}}, cfg, 1, "a_val,b_val")
    assert not (tmp_path / RESULTS_FILE).exists()  # nothing half-written


def test_atomic_write_keeps_old_file_on_failure(tmp_path, monkeypatch):
    cfg = _retinanet_cfg()
    save_results(str(tmp_path), {"bbox": METRICS}, cfg, 1, "a_val")
    before = (tmp_path / RESULTS_FILE).read_text()

    def failing_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(run_files.os, "replace", failing_replace)
    with pytest.raises(OSError, match="disk full"):
        save_results(str(tmp_path), {"bbox": dict(METRICS, AP=99.0)}, cfg, 2, "a_val")
    assert (tmp_path / RESULTS_FILE).read_text() == before
    assert sorted(os.listdir(tmp_path)) == [RESULTS_FILE]  # temporary file removed


def test_only_main_process_writes(tmp_path, monkeypatch):
    from detectron2.utils import comm

    monkeypatch.setattr(comm, "is_main_process", lambda: False)
    assert save_results(str(tmp_path), {"bbox": METRICS}, _retinanet_cfg(), 1, "a_val") is None
    assert write_run_status(str(tmp_path), "running") is None
    assert os.listdir(tmp_path) == []


def test_run_status(tmp_path):
    p = write_run_status(str(tmp_path), "running", start_iter=0, max_iter=100)
    first = load_run_status(p)
    assert first["state"] == "running" and first["max_iter"] == 100 and first["world_size"] == 1
    write_run_status(str(tmp_path), "failed", iteration=7, error="FloatingPointError: nan loss")
    second = load_run_status(p)
    assert second["state"] == "failed" and second["started_at"] == first["started_at"]
    assert second["error"].startswith("FloatingPointError")
    with pytest.raises(ValueError, match="run state must be one of"):
        write_run_status(str(tmp_path), "done")
    with pytest.raises(TypeError, match="not JSON-serializable"):
        write_run_status(str(tmp_path), "finished", model=object())
    assert load_run_status(p)["state"] == "failed"  # the failed write changed nothing


@pytest.mark.parametrize("content, message", [
    ("", "is empty"),
    ('{"schema_version": 1, "run": ', "not valid JSON (line 1, column"),
    ("[1, 2]", "expected a JSON object"),
    ('{"schema_version": 7}', "unsupported schema_version 7"),
    ('{"schema_version": 1, "run": {"detector_label": "x", "normalizer": "GN", '
     '"images_per_gpu": 2}, "evaluations": {}}', "no 'evaluations'"),
    ('{"schema_version": 1, "run": {"detector_label": "x", "normalizer": "GN", '
     '"images_per_gpu": 2}, "evaluations": {"v": {"metrics": {"bbox": {"AP": "high"}}}}}',
     "bbox AP is 'high'"),
])
def test_malformed_results_file_messages(tmp_path, content, message):
    path = tmp_path / RESULTS_FILE
    path.write_text(content)
    with pytest.raises(RunFileError) as info:
        load_results(str(path))
    assert message in str(info.value)
    assert str(path) in str(info.value)


def test_missing_and_bad_status_files(tmp_path):
    with pytest.raises(RunFileError, match="not found"):
        load_results(str(tmp_path / RESULTS_FILE))
    (tmp_path / RUN_STATUS_FILE).write_text('{"state": "paused"}')
    with pytest.raises(RunFileError, match="'state' is 'paused'"):
        load_run_status(str(tmp_path / RUN_STATUS_FILE))


def test_last_logged_iteration_skips_partial_line(tmp_path):
    p = tmp_path / "metrics.json"
    p.write_text('{"iteration": 19, "total_loss": 1.0}\n{"iteration": 39, "total_loss": 0.9}\n'
                 '{"iteration": 5')
    assert run_files.last_logged_iteration(str(p)) == 39
    assert run_files.last_logged_iteration(str(tmp_path / "none.json")) is None


def test_json_safe_converts_numpy_and_nan():
    import numpy as np

    out = run_files._json_safe({"a": np.float32(1.5), "b": [np.nan, np.int64(3)], "c": math.inf})
    assert out == {"a": 1.5, "b": [None, 3], "c": None}
