"""d2_norms' DatasetEvaluator: end to end from model outputs (Instances) to COCO AP."""
import json
import math
import os

import pytest

import d2_norms  # noqa: F401
from detectron2.config import get_cfg
from detectron2.data import MetadataCatalog

from d2_norms.config import add_d2_norms_config
from d2_norms.evaluation import build_evaluator
from d2_norms.evaluation.backends import (
    BACKENDS,
    COCO_METRICS,
    evaluate_coco_results,
    load_coco_gt,
)
from d2_norms.evaluation.coco_evaluator import (
    PREDICTIONS_FILE,
    RAW_PREDICTIONS_FILE,
    D2NormsCOCOEvaluator,
)

from coco_cases import (  # tests/coco_cases.py
    make_coco_case,
    predictions_from_ground_truth,
    register_case,
    to_instances,
)

pytest.importorskip("faster_coco_eval")
ATOL = 1e-4


def _cfg(mask_on=True, backend="auto", dump=False):
    cfg = get_cfg()
    add_d2_norms_config(cfg)
    cfg.MODEL.MASK_ON = mask_on
    cfg.D2NORMS.EVAL.BACKEND = backend
    cfg.D2NORMS.EVAL.DUMP_PREDICTIONS = dump  # only where a test asks (into its tmp_path)
    return cfg


def _run(evaluator, case, dataset, images=None):
    contiguous = MetadataCatalog.get(dataset).thing_dataset_id_to_contiguous_id
    evaluator.reset()
    dets = case.detections if images is None else [case.detections[i] for i in images]
    for i in range(0, len(dets), 2):  # batches of two images, as a test loader could give
        chunk = dets[i:i + 2]
        inputs = [{"image_id": d.image_id, "height": d.height, "width": d.width} for d in chunk]
        outputs = [{"instances": to_instances(d, contiguous, case)} for d in chunk]
        evaluator.process(inputs, outputs)
    return evaluator.evaluate()


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
    """A registered generated set with non-contiguous category ids (3, 4, ...)."""
    case = make_coco_case(40, 30, num_categories=6, with_masks=True, seed=5, first_category_id=3)
    name = "d2norms_test_eval_generated"
    register_case(case, name, str(tmp_path_factory.mktemp("generated")))
    return case, name


@pytest.fixture(scope="module")
def synthetic_val(tmp_path_factory):
    """The project's synthetic shapes val split (small variant, own cache root)."""
    from d2_norms.data import register_synthetic, unregister_synthetic

    prefix = "d2norms_test_eval_shapes"
    _, val = register_synthetic(prefix, num_train=1, num_val=24, image_size=96,
                                root=tmp_path_factory.mktemp("shapes"))
    yield val
    unregister_synthetic(prefix)


@pytest.mark.parametrize("backend", BACKENDS)
def test_evaluator_matches_direct_reference(generated, backend):
    """Instances -> evaluator == pycocotools on the same detections in COCO result format."""
    case, name = generated
    results = _run(build_evaluator(_cfg(backend=backend), name, output_dir=None), case, name)
    gt = load_coco_gt(case.gt, "pycocotools")
    for task in ("bbox", "segm"):
        ref = evaluate_coco_results(gt, case.coco_results(), task, "pycocotools")
        for m in COCO_METRICS:
            assert abs(results[task][m] - ref.metrics[m]) <= ATOL, (backend, task, m)
        # per-category AP in detectron2's naming, for every class of the dataset
        assert {k for k in results[task] if k.startswith("AP-")} == {
            f"AP-class_{c}" for c in range(3, 9)}


def test_synthetic_val_backends_agree(synthetic_val):
    """Both backends through the evaluator on the synthetic shapes val (masks + boxes)."""
    meta = MetadataCatalog.get(synthetic_val)
    with open(meta.json_file) as f:
        gt = json.load(f)
    case = predictions_from_ground_truth(gt, detections_per_image=12, seed=3)
    out = {b: _run(build_evaluator(_cfg(backend=b), synthetic_val, output_dir=None), case,
                   synthetic_val) for b in BACKENDS}
    for task in ("bbox", "segm"):
        for m in COCO_METRICS:
            a, b = out["faster_coco_eval"][task][m], out["pycocotools"][task][m]
            assert (math.isnan(a) and math.isnan(b)) or abs(a - b) <= ATOL, (task, m, a, b)
        assert 5.0 < out["pycocotools"][task]["AP"] < 95.0


def test_missing_contiguous_mapping_is_derived_from_ground_truth(generated, tmp_path):
    case, _ = generated
    name = "d2norms_test_eval_nomap"
    register_case(case, name, str(tmp_path))
    contiguous = dict(MetadataCatalog.get(name).thing_dataset_id_to_contiguous_id)
    MetadataCatalog.remove(name)
    MetadataCatalog.get(name).set(json_file=os.path.join(str(tmp_path), f"{name}.json"))
    evaluator = D2NormsCOCOEvaluator(name, ("bbox",), backend="faster_coco_eval")
    evaluator.reset()
    for d in case.detections:
        evaluator.process([{"image_id": d.image_id}], [{"instances": to_instances(d, contiguous)}])
    res = evaluator.evaluate()
    ref = evaluate_coco_results(load_coco_gt(case.gt, "pycocotools"), case.coco_results(), "bbox",
                                "pycocotools")
    assert abs(res["bbox"]["AP"] - ref.metrics["AP"]) <= ATOL


def test_box_only_model_and_prediction_dump(generated, tmp_path):
    case, name = generated
    evaluator = build_evaluator(_cfg(mask_on=False, dump=True), name, output_dir=str(tmp_path))
    results = _run(evaluator, case, name)
    assert set(results) == {"bbox"}
    with open(tmp_path / PREDICTIONS_FILE) as f:
        dumped = json.load(f)
    assert len(dumped) == sum(len(d.scores) for d in case.detections)
    # dataset category ids, not the model's contiguous indices
    assert {r["category_id"] for r in dumped} <= {c["id"] for c in case.gt["categories"]}
    # detectron2's per-image file: model class indices, one entry per image
    import torch

    raw = torch.load(tmp_path / RAW_PREDICTIONS_FILE, weights_only=False)
    assert [p["image_id"] for p in raw] == [d.image_id for d in case.detections]
    assert {i["category_id"] for p in raw for i in p["instances"]} <= set(range(6))


def test_config_selects_backend_and_is_idempotent(generated):
    _, name = generated
    cfg = _cfg(backend="pycocotools")
    add_d2_norms_config(cfg)  # second call keeps the user's value
    assert cfg.D2NORMS.EVAL.BACKEND == "pycocotools"
    assert build_evaluator(cfg, name).backend == "pycocotools"
    assert build_evaluator(_cfg(), name).backend == "faster_coco_eval"
    frozen = get_cfg()
    frozen.freeze()
    with pytest.raises(RuntimeError, match="frozen"):
        add_d2_norms_config(frozen)


def test_clear_errors(generated):
    case, name = generated
    with pytest.raises(KeyError, match="not registered"):
        build_evaluator(_cfg(), "no_such_dataset_xyz", output_dir=None)
    # a mask model whose outputs have no masks
    evaluator = build_evaluator(_cfg(mask_on=True), name)
    evaluator.reset()
    contiguous = MetadataCatalog.get(name).thing_dataset_id_to_contiguous_id
    d = case.detections[0]
    evaluator.process([{"image_id": d.image_id}], [{"instances": to_instances(d, contiguous)}])
    with pytest.raises(ValueError, match="no pred_masks"):
        evaluator.evaluate()
    # classes beyond the dataset's
    evaluator = build_evaluator(_cfg(mask_on=False), name)
    evaluator.reset()
    inst = to_instances(d, contiguous)
    inst.pred_classes[0] = 50
    evaluator.process([{"image_id": d.image_id}], [{"instances": inst}])
    with pytest.raises(ValueError, match="NUM_CLASSES"):
        evaluator.evaluate()
    cfg = _cfg()
    cfg.D2NORMS.EVAL.BACKEND = "fast_c"
    with pytest.raises(ValueError, match="D2NORMS.EVAL.BACKEND"):
        build_evaluator(cfg, name)


def _distributed_worker(rank, world, port, json_file, out_file):
    import torch
    import torch.distributed as dist

    from coco_cases import make_coco_case, register_case, to_instances

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world)
    case = make_coco_case(40, 30, num_categories=6, with_masks=True, seed=5, first_category_id=3)
    name = "d2norms_test_eval_dist"
    register_case(case, name, os.path.dirname(json_file))
    evaluator = build_evaluator(_cfg(), name)
    contiguous = MetadataCatalog.get(name).thing_dataset_id_to_contiguous_id
    evaluator.reset()
    for d in case.detections[rank::world]:  # each rank sees its share of the images
        evaluator.process([{"image_id": d.image_id}],
                          [{"instances": to_instances(d, contiguous, case)}])
    results = evaluator.evaluate()
    if rank == 0:
        with open(out_file, "w") as f:
            json.dump(results, f)
    else:
        assert results == {}
    # Tear the group down together (as test_layers_registry does): rank 1 returns from
    # evaluate() while rank 0 still runs COCOeval, and a gloo peer closing early aborted a
    # process once (SIGABRT) in a full-suite run.
    dist.barrier()
    dist.destroy_process_group()


@pytest.mark.slow
def test_distributed_gather_equals_single_process(generated, tmp_path, free_port):
    import torch.multiprocessing as mp

    case, name = generated
    single = _run(build_evaluator(_cfg(), name), case, name)
    out_file = str(tmp_path / "dist.json")
    mp.spawn(_distributed_worker, args=(2, free_port(), str(tmp_path / "gt.json"), out_file),
             nprocs=2, join=True)
    with open(out_file) as f:
        dist_results = json.load(f)
    for task in ("bbox", "segm"):
        for m in COCO_METRICS:
            assert abs(dist_results[task][m] - single[task][m]) <= ATOL, (task, m)
