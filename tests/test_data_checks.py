"""Bad dataset input is refused before training with a message naming the file and the fix."""
import json
import os
import shutil

import pytest

import d2_norms  # noqa: F401  (shims)
from d2_norms.data import (DatasetError, MissingImageError, SafeDatasetMapper,
                           UnreadableImageError, check_datasets, load_json_checked,
                           register_synthetic, unregister_synthetic)
from d2_norms.data.synthetic import ShapesSpec, ensure_synthetic
from detectron2.config import get_cfg
from detectron2.data import DatasetCatalog, build_detection_test_loader

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

SPEC = ShapesSpec(num_images=8, image_size=64, seed=11)


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    return ensure_synthetic("checks_src", SPEC, tmp_path_factory.mktemp("checks"))


@pytest.fixture
def coco_copy(source, tmp_path, request, register_coco):
    """A writable copy of a tiny COCO set registered as a custom dataset; returns
    (name, json path, image dir)."""
    root = tmp_path / "set"
    shutil.copytree(source.root, root)
    name = register_coco(f"d2n_checks_{request.node.name}"[:80], root / "annotations.json",
                         root / "images")
    return name, root / "annotations.json", root / "images"


def make_cfg(train=(), test=(), arch="GeneralizedRCNN", num_classes=3):
    cfg = get_cfg()
    cfg.DATASETS.TRAIN = tuple(train)
    cfg.DATASETS.TEST = tuple(test)
    cfg.MODEL.META_ARCHITECTURE = arch
    cfg.MODEL.ROI_HEADS.NUM_CLASSES = num_classes
    cfg.MODEL.RETINANET.NUM_CLASSES = num_classes
    return cfg


def test_a_good_set_passes_with_its_counts(coco_copy):
    name, json_file, images = coco_copy
    (summary,) = check_datasets(make_cfg([name], [name]))
    data = json.loads(json_file.read_text())
    assert summary.num_images == len(data["images"]) == 8
    assert summary.num_annotations == len(data["annotations"])
    assert summary.num_classes == 3


def test_missing_builtin_root_names_detectron2_datasets(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # builtin sets live under the relative default "datasets"
    monkeypatch.delenv("DETECTRON2_DATASETS", raising=False)
    with pytest.raises(DatasetError) as e:
        check_datasets(make_cfg(["coco_2017_train"], num_classes=80))
    msg = str(e.value)
    assert "coco_2017_train" in msg and "DETECTRON2_DATASETS" in msg
    assert str(tmp_path / "datasets") in msg and "does not exist" in msg


def test_missing_annotation_file_and_image_dir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "datasets" / "coco").mkdir(parents=True)
    with pytest.raises(DatasetError) as e:
        check_datasets(make_cfg(test=["coco_2017_val"], num_classes=80))
    msg = str(e.value)
    assert "annotation file datasets/coco/annotations/instances_val2017.json does not exist" \
        in msg
    assert "image directory datasets/coco/val2017 does not exist" in msg
    assert "DETECTRON2_DATASETS" in msg


def test_missing_custom_annotation_file(coco_copy):
    name, json_file, _ = coco_copy
    json_file.unlink()
    with pytest.raises(DatasetError, match=f"annotation file {json_file} does not exist"):
        check_datasets(make_cfg([name]))


@pytest.mark.parametrize("damage,expect", [
    (lambda text: text[: len(text) // 2], "probably truncated"),
    (lambda text: text.replace('"images":', '"images" ', 1), "corrupt"),
    (lambda text: "", "the file is empty"),
])
def test_corrupt_or_truncated_json(coco_copy, damage, expect):
    name, json_file, _ = coco_copy
    json_file.write_text(damage(json_file.read_text()))
    with pytest.raises(DatasetError) as e:
        check_datasets(make_cfg([name]))
    msg = str(e.value)
    assert str(json_file) in msg and expect in msg
    assert "line 1, column" in msg and "character" in msg  # where the parser stopped
    # The same position json itself reports.
    try:
        json.loads(json_file.read_text())
    except json.JSONDecodeError as je:
        assert f"character {je.pos} of" in msg


def test_check_without_parsing_skips_json(coco_copy):
    name, json_file, _ = coco_copy
    json_file.write_text("{")
    assert check_datasets(make_cfg([name]), deep=False)[0].num_images is None
    with pytest.raises(DatasetError):
        load_json_checked(str(json_file))


@pytest.mark.parametrize("arch,key", [("GeneralizedRCNN", "MODEL.ROI_HEADS.NUM_CLASSES"),
                                      ("RetinaNet", "MODEL.RETINANET.NUM_CLASSES")])
def test_categories_must_match_num_classes(coco_copy, arch, key):
    name, _, _ = coco_copy
    check_datasets(make_cfg([name], arch=arch, num_classes=3))
    with pytest.raises(DatasetError) as e:
        check_datasets(make_cfg([name], arch=arch, num_classes=80))
    assert f"has 3 categories (circle, triangle, square) but {key} is 80" in str(e.value)
    assert f"set {key} 3" in str(e.value)


def test_synthetic_sets_are_generated_and_checked(tmp_path):
    train, val = register_synthetic("d2n_checks_syn", num_train=3, num_val=3, image_size=64,
                                    root=tmp_path, num_classes=2)
    try:
        assert not any(tmp_path.iterdir())
        with pytest.raises(DatasetError, match="d2n_checks_syn_val' has 2 categories"):
            check_datasets(make_cfg([train], [val], num_classes=3))
        summaries = check_datasets(make_cfg([train], [val], num_classes=2))
        assert [s.num_images for s in summaries] == [3, 3]
        assert all(os.path.isfile(s.json_file) for s in summaries)
    finally:
        unregister_synthetic("d2n_checks_syn")


def test_annotations_with_unknown_category(coco_copy):
    name, json_file, _ = coco_copy
    data = json.loads(json_file.read_text())
    data["annotations"][0]["category_id"] = 42
    json_file.write_text(json.dumps(data))
    with pytest.raises(DatasetError, match="category ids 42 that are not in its 'categories'"):
        check_datasets(make_cfg([name]))


def test_missing_listed_images_are_named(coco_copy):
    name, _, images = coco_copy
    (images / "000003.png").unlink()
    (images / "000005.png").unlink()
    with pytest.raises(DatasetError) as e:
        check_datasets(make_cfg([name]))
    msg = str(e.value)
    assert "2 of the 8 images" in msg
    assert str(images / "000003.png") in msg and str(images / "000005.png") in msg


def test_unregistered_name_suggests_close_ones():
    with pytest.raises(DatasetError, match="'synthetic_shapes_trian' .* is not registered; did "
                                           "you mean 'synthetic_shapes_train'"):
        check_datasets(make_cfg(["synthetic_shapes_trian"]))


def test_all_problems_are_reported_together(coco_copy):
    name, json_file, _ = coco_copy
    with pytest.raises(DatasetError) as e:
        check_datasets(make_cfg([name, "nope_train"], num_classes=5))
    assert str(e.value).count("\n  - ") == 2


def loader_cfg(name, workers=0):
    cfg = make_cfg([name], [name])
    cfg.INPUT.MIN_SIZE_TRAIN = (64,)
    cfg.INPUT.MAX_SIZE_TRAIN = 64
    cfg.INPUT.MIN_SIZE_TEST = 64
    cfg.SOLVER.IMS_PER_BATCH = 8
    cfg.DATALOADER.NUM_WORKERS = workers
    cfg.DATALOADER.FILTER_EMPTY_ANNOTATIONS = False
    return cfg


def test_mapper_names_a_missing_image(coco_copy):
    name, _, images = coco_copy
    missing = images / "000002.png"
    missing.unlink()
    cfg = loader_cfg(name)
    loader = build_detection_test_loader(cfg, name, mapper=SafeDatasetMapper(cfg, False))
    with pytest.raises(MissingImageError, match=f"image file {missing} .*does not exist"):
        list(loader)


def test_mapper_names_an_unreadable_image_across_worker_processes(coco_copy):
    name, _, images = coco_copy
    broken = images / "000004.png"
    broken.write_bytes(broken.read_bytes()[:100])  # truncated PNG
    cfg = loader_cfg(name, workers=1)
    loader = build_detection_test_loader(cfg, name, mapper=SafeDatasetMapper(cfg, False))
    with pytest.raises(UnreadableImageError) as e:
        list(loader)
    assert f"image file {broken} (image_id 5) cannot be read as an image" in str(e.value)


def test_mapper_adds_the_image_to_other_errors(coco_copy):
    name, _, _ = coco_copy
    cfg = loader_cfg(name)
    record = dict(DatasetCatalog.get(name)[0], height=50)  # wrong size in the annotations
    with pytest.raises(Exception) as e:
        SafeDatasetMapper(cfg, True)(record)
    assert not isinstance(e.value, DatasetError)
    assert any(record["file_name"] in note for note in e.value.__notes__)
    assert os.path.exists(record["file_name"])
