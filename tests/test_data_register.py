"""Registration of the synthetic set with detectron2: lazy generation, dataset dicts, loader,
COCO evaluation."""
import itertools

import numpy as np
import pytest
import torch

import d2_norms  # noqa: F401  (shims)
import d2_norms.data as d2n_data
from detectron2.config import get_cfg
from detectron2.data import (DatasetCatalog, DatasetMapper, MetadataCatalog,
                             build_detection_train_loader)
from detectron2.structures import BoxMode, Boxes, Instances, PolygonMasks
from detectron2.structures.masks import polygons_to_bitmask

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

PREFIX = "d2n_test_register"


@pytest.fixture(scope="module")
def registered(tmp_path_factory):
    root = tmp_path_factory.mktemp("register")
    names = d2n_data.register_synthetic(PREFIX, num_train=12, num_val=6, image_size=64, seed=5,
                                        root=root)
    yield names, root
    d2n_data.unregister_synthetic(PREFIX)


def test_default_names_are_registered_on_import():
    for name in ("synthetic_shapes_train", "synthetic_shapes_val",
                 "synthetic_shapes_tiny_train", "synthetic_shapes_tiny_val"):
        assert name in DatasetCatalog.list()
        meta = MetadataCatalog.get(name)
        assert meta.thing_classes == ["circle", "triangle", "square"]
        assert meta.evaluator_type == "coco"
    spec = MetadataCatalog.get("synthetic_shapes_train").synthetic_spec
    assert (spec["num_images"], spec["image_size"]) == (d2n_data.DEFAULT_NUM_TRAIN, 128)
    assert MetadataCatalog.get("synthetic_shapes_val").synthetic_spec["num_images"] == \
        d2n_data.DEFAULT_NUM_VAL
    # make demo's set: the default set's images and sizes, 2 classes
    demo = MetadataCatalog.get("synthetic_shapes_demo_train")
    assert demo.thing_classes == ["circle", "triangle"]
    assert {k: v for k, v in demo.synthetic_spec.items() if k != "num_classes"} == \
        {k: v for k, v in spec.items() if k != "num_classes"}


def test_registering_is_lazy_and_json_file_generates(registered):
    (train, val), root = registered
    meta = MetadataCatalog.get(val)
    listed = meta.as_dict()["json_file"]
    assert listed.startswith(str(root)) and not any(root.iterdir())  # nothing generated yet
    assert meta.json_file == listed  # first access generates the split
    assert (root / listed).is_file() and meta.image_root == meta.as_dict()["image_root"]
    assert not (root / MetadataCatalog.get(train).as_dict()["json_file"]).exists()


def test_dataset_dicts_have_detectron2_fields(registered):
    (train, _), _ = registered
    dicts = DatasetCatalog.get(train)
    assert len(dicts) == 12 and [d["image_id"] for d in dicts] == list(range(1, 13))
    assert any(not d["annotations"] for d in dicts)
    for d in dicts:
        assert (d["height"], d["width"]) == (64, 64)
        with open(d["file_name"], "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
        for a in d["annotations"]:
            assert a["bbox_mode"] == BoxMode.XYWH_ABS and len(a["bbox"]) == 4
            assert 0 <= a["category_id"] < 3 and a["iscrowd"] == 0
            assert all(len(p) >= 6 for p in a["segmentation"])
    assert MetadataCatalog.get(train).thing_dataset_id_to_contiguous_id == {1: 0, 2: 1, 3: 2}


def test_train_loader_yields_a_batch_with_masks(registered):
    (train, _), _ = registered
    cfg = get_cfg()
    cfg.DATASETS.TRAIN = (train,)
    cfg.INPUT.MIN_SIZE_TRAIN = (64,)
    cfg.INPUT.MAX_SIZE_TRAIN = 64
    cfg.INPUT.MASK_FORMAT = "polygon"
    cfg.MODEL.MASK_ON = True
    cfg.SOLVER.IMS_PER_BATCH = 2
    cfg.DATALOADER.NUM_WORKERS = 0
    loader = build_detection_train_loader(cfg, mapper=DatasetMapper(cfg, is_train=True))
    areas = {a["bbox"][2] * a["bbox"][3] for d in DatasetCatalog.get(train)
             for a in d["annotations"]}
    batches = list(itertools.islice(iter(loader), 8))  # several, so flipped images occur
    assert all(len(batch) == 2 for batch in batches)
    for item in itertools.chain.from_iterable(batches):
        assert item["image"].shape == (3, 64, 64) and item["image"].dtype == torch.uint8
        inst = item["instances"]
        assert len(inst) > 0  # empty images are filtered out of training
        assert isinstance(inst.gt_masks, PolygonMasks)
        assert inst.gt_classes.min() >= 0 and inst.gt_classes.max() < 3
        # Same scale, at most flipped: every box keeps the area of a dataset box.
        assert {round(float(a)) for a in inst.gt_boxes.area()} <= {round(a) for a in areas}
        # The box is the mask's tight pixel box, so rasterizing the (maybe flipped) polygons
        # again gives that box back. Pixel-center ties may land one pixel off after a flip;
        # the polygon vertices themselves are no bound (a sharp tip can cover no pixel).
        for box, polys in zip(inst.gt_boxes.tensor.numpy(), inst.gt_masks.polygons):
            mask = polygons_to_bitmask(polys, 64, 64)
            ys, xs = np.nonzero(mask)
            assert len(xs) > 0
            raster_box = np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], np.float32)
            assert np.abs(raster_box - box).max() <= 1.0, (raster_box, box)


def test_coco_evaluator_scores_ground_truth_as_perfect(registered):
    """COCOEvaluator works from the registered metadata (json_file, id mapping)."""
    from detectron2.evaluation import COCOEvaluator
    from pycocotools.coco import COCO

    (_, val), _ = registered
    # detectron2's defaults (use_fast_impl=True): without compiled ops detectron2's fallback
    # (pycocotools) evaluates, d2_norms or not
    evaluator = COCOEvaluator(val, tasks=("bbox", "segm"), distributed=False)
    evaluator.reset()
    coco = COCO(MetadataCatalog.get(val).json_file)
    id_map = MetadataCatalog.get(val).thing_dataset_id_to_contiguous_id
    for d in DatasetCatalog.get(val):
        anns = coco.imgToAnns[d["image_id"]]
        inst = Instances((64, 64))
        boxes = [BoxMode.convert(a["bbox"], BoxMode.XYWH_ABS, BoxMode.XYXY_ABS) for a in anns]
        inst.pred_boxes = Boxes(torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4))
        inst.scores = torch.ones(len(anns))
        inst.pred_classes = torch.tensor([id_map[a["category_id"]] for a in anns],
                                         dtype=torch.int64)
        inst.pred_masks = torch.tensor(np.array([coco.annToMask(a) for a in anns]).reshape(
            -1, 64, 64)).bool()
        evaluator.process([d], [{"instances": inst}])
    results = evaluator.evaluate()
    assert results["bbox"]["AP"] == pytest.approx(100.0)
    assert results["segm"]["AP"] == pytest.approx(100.0)


def test_register_is_idempotent_and_refuses_conflicts(registered, tmp_path):
    (train, val), root = registered
    again = d2n_data.register_synthetic(PREFIX, num_train=12, num_val=6, image_size=64, seed=5,
                                        root=root)
    assert again == (train, val)
    with pytest.raises(ValueError, match="already registered .* other parameters"):
        d2n_data.register_synthetic(PREFIX, num_train=13, num_val=6, image_size=64, seed=5,
                                    root=root)
    with pytest.raises(ValueError, match="not by d2_norms"):
        d2n_data.register_synthetic("coco_2017")
    with pytest.raises(TypeError, match="known options: .*max_objects"):
        d2n_data.register_synthetic("d2n_test_typo", max_object=3)
    with pytest.raises(ValueError, match="num_classes must be"):
        d2n_data.register_synthetic("d2n_test_bad", num_classes=0)
    assert "d2n_test_typo_train" not in DatasetCatalog.list()
    names = d2n_data.register_synthetic("d2n_test_other", num_train=2, num_val=2, root=tmp_path,
                                        num_classes=5, max_objects=2)
    try:
        assert MetadataCatalog.get(names[0]).thing_classes == list(d2n_data.SHAPE_CLASSES)
    finally:
        d2n_data.unregister_synthetic("d2n_test_other")
    assert names[0] not in DatasetCatalog.list() and names[0] not in MetadataCatalog.keys()
