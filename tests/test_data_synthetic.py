"""The synthetic COCO set: validity with pycocotools, content, determinism, cache and atomicity."""
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import cv2
import numpy as np
import pytest
from pycocotools.coco import COCO

import d2_norms  # noqa: F401  (shims)
from d2_norms.data import synthetic
from d2_norms.data.synthetic import (ShapesSpec, dataset_dir, empty_image_indices,
                                     ensure_synthetic)

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

SPEC = ShapesSpec(num_images=48, image_size=96, seed=3)
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
    root = tmp_path_factory.mktemp("shapes")
    paths = ensure_synthetic("shapes_test", SPEC, root)
    coco = COCO(str(paths.json_file))
    return paths, coco


def load_rgb(path):
    return cv2.imread(str(path), cv2.IMREAD_UNCHANGED)[:, :, ::-1].astype(np.int32)


def all_files(directory):
    return {p.relative_to(directory).as_posix(): p.read_bytes()
            for p in sorted(Path(directory).rglob("*")) if p.is_file()}


def test_pycocotools_loads_a_valid_instance_set(generated):
    paths, coco = generated
    assert paths.root == dataset_dir("shapes_test", SPEC, paths.root.parent)
    assert [c["name"] for c in coco.loadCats(coco.getCatIds())] == ["circle", "triangle", "square"]
    assert len(coco.getImgIds()) == SPEC.num_images
    for img in coco.dataset["images"]:
        assert (img["width"], img["height"]) == (96, 96)
        assert cv2.imread(str(paths.image_root / img["file_name"])).shape == (96, 96, 3)
    for ann in coco.dataset["annotations"]:
        assert ann["iscrowd"] == 0
        assert isinstance(ann["segmentation"], list) and ann["segmentation"]
        assert all(len(p) >= 6 and len(p) % 2 == 0 for p in ann["segmentation"])
        mask = coco.annToMask(ann).astype(bool)
        ys, xs = np.nonzero(mask)
        # area and bbox are the mask's pixel count and tight pixel box, computed here directly.
        assert ann["area"] == mask.sum() > 0
        assert ann["bbox"] == [xs.min(), ys.min(), xs.max() - xs.min() + 1,
                               ys.max() - ys.min() + 1]


def test_class_counts_empty_images_and_sizes(generated):
    _, coco = generated
    anns = coco.dataset["annotations"]
    per_class = Counter(a["category_id"] for a in anns)
    assert sum(len(coco.getAnnIds(catIds=[c])) for c in (1, 2, 3)) == len(anns)
    assert set(per_class) == {1, 2, 3}
    assert min(per_class.values()) >= 0.15 * len(anns)
    per_image = Counter(a["image_id"] for a in anns)
    empty = [i for i in coco.getImgIds() if per_image[i] == 0]
    assert empty == [int(i) + 1 for i in empty_image_indices(SPEC)]
    assert len(empty) == round(0.1 * SPEC.num_images)
    assert max(per_image.values()) <= SPEC.max_objects and len(set(per_image.values())) >= 3
    # Unoccluded shapes: extent between ~0.6x the smallest and the largest circumdiameter
    # (stretch <= 1.25 in area-preserving form widens by at most sqrt(1.25)).
    lo, hi = SPEC.min_object_size * 96, SPEC.max_object_size * 96
    sides = [max(a["bbox"][2:]) for a in anns if a["area"] == a["amodal_area"]]
    assert min(sides) >= 0.6 * lo and max(sides) <= hi * np.sqrt(1.25) + 1
    assert max(sides) > 0.6 * hi and min(sides) < 2 * lo  # the range is actually used


def test_overlapping_objects_exist_and_keep_visible_masks(generated):
    _, coco = generated
    occluded = [a for a in coco.dataset["annotations"] if a["area"] < a["amodal_area"]]
    assert len(occluded) >= 3
    for a in occluded:
        assert a["area"] >= SPEC.min_visible_fraction * a["amodal_area"]
        # The occluder is drawn later (greater depth) and its box overlaps the occluded box.
        x, y, w, h = a["bbox"]
        later = [b for b in coco.imgToAnns[a["image_id"]] if b["depth"] > a["depth"]]
        assert any(bx < x + w and x < bx + bw and by < y + h and y < by + bh
                   for bx, by, bw, bh in (b["bbox"] for b in later))


def test_masks_are_exactly_the_pixels_painted_in_the_object_colour(generated):
    paths, coco = generated
    noise = SPEC.object_noise
    checked = 0
    for img in coco.dataset["images"]:
        rgb = load_rgb(paths.image_root / img["file_name"])
        masks = [(a, coco.annToMask(a).astype(bool)) for a in coco.imgToAnns[img["id"]]]
        for i, (a, m) in enumerate(masks):
            for _, other in masks[i + 1:]:
                assert not (m & other).any()  # visible masks never overlap
            dev = np.abs(rgb - np.array(a["fill_rgb"])).max(axis=2)
            # Inside: within the colour noise; the 4-neighbour ring outside: clearly different.
            assert dev[m].max() <= noise
            ring = cv2.dilate(m.astype(np.uint8), np.array([[0, 1, 0], [1, 1, 1], [0, 1, 0]],
                                                           np.uint8)).astype(bool) & ~m
            assert dev[ring].min() > noise
            checked += 1
    assert checked == len(coco.dataset["annotations"])


def test_same_seed_same_bytes_other_seed_or_split_differs(generated, tmp_path):
    paths, _ = generated
    again = ensure_synthetic("shapes_test", SPEC, tmp_path / "again")
    assert all_files(again.root) == all_files(paths.root)
    other_seed = ensure_synthetic("shapes_test", ShapesSpec(num_images=48, image_size=96, seed=4),
                                  tmp_path / "other")
    other_split = synthetic.draw_image(ShapesSpec(num_images=48, image_size=96, seed=3,
                                                  split="val"), 1)[0]
    assert other_seed.json_file.read_bytes() != paths.json_file.read_bytes()
    first = (paths.image_root / "000001.png").read_bytes()
    assert (other_seed.image_root / "000001.png").read_bytes() != first
    assert not np.array_equal(other_split, load_rgb(paths.image_root / "000001.png"))


def test_256_pixel_images(tmp_path):
    spec = ShapesSpec(num_images=4, image_size=256, seed=1, empty_fraction=0.0)
    paths = ensure_synthetic("big", spec, tmp_path)
    coco = COCO(str(paths.json_file))
    assert {(i["width"], i["height"]) for i in coco.dataset["images"]} == {(256, 256)}
    assert cv2.imread(str(paths.image_root / "000000.png")).shape == (256, 256, 3)
    assert max(max(a["bbox"][2:]) for a in coco.dataset["annotations"]) > 40


def test_cache_is_reused_and_a_damaged_copy_regenerated(tmp_path, monkeypatch):
    spec = ShapesSpec(num_images=6, image_size=64)
    paths = ensure_synthetic("reuse", spec, tmp_path)
    reference = all_files(paths.root)
    synthetic._VERIFIED.clear()  # as in a new process

    def fail(*args, **kwargs):
        raise AssertionError("regenerated although the cache is complete")

    with monkeypatch.context() as m:
        m.setattr(synthetic, "write_coco_dataset", fail)
        assert ensure_synthetic("reuse", spec, tmp_path) == paths
    # A deleted image, then an edited annotation file: both detected, the set rebuilt.
    for damage in (lambda: (paths.image_root / "000002.png").unlink(),
                   lambda: paths.json_file.write_text("{}")):
        damage()
        synthetic._VERIFIED.clear()
        assert ensure_synthetic("reuse", spec, tmp_path) == paths
        assert all_files(paths.root) == reference
    assert sorted(p.name for p in tmp_path.iterdir()) == [f".{paths.root.name}.lock",
                                                          paths.root.name]


def test_failed_generation_leaves_nothing(tmp_path, monkeypatch):
    spec = ShapesSpec(num_images=6, image_size=64)
    real = synthetic.draw_image

    def draw_then_fail(spec_, index):
        if index == 3:
            raise RuntimeError("disk on fire")
        return real(spec_, index)

    monkeypatch.setattr(synthetic, "draw_image", draw_then_fail)
    with pytest.raises(RuntimeError, match="disk on fire"):
        ensure_synthetic("failing", spec, tmp_path)
    assert [p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")] == []


GENERATE = """
import logging, sys, d2_norms
logging.basicConfig(level=logging.INFO)
from d2_norms.data.synthetic import ShapesSpec, ensure_synthetic
spec = ShapesSpec(num_images=int(sys.argv[2]), image_size=64, seed=7)
print(ensure_synthetic("killed", spec, sys.argv[1]).root, flush=True)
"""


def run_generator(root, num_images):
    return subprocess.Popen([sys.executable, "-c", GENERATE, str(root), str(num_images)],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_leftovers_of_an_interrupted_generation_are_replaced(tmp_path):
    spec = ShapesSpec(num_images=6, image_size=64)
    final = dataset_dir("left", spec, tmp_path)
    leftover = tmp_path / f".tmp-{final.name}-99999-deadbeef"
    (leftover / "images").mkdir(parents=True)
    (leftover / "images" / "000000.png").write_bytes(b"\x89PNG half")
    (leftover / "annotations.json").write_text('{"images": [')
    (final / "images").mkdir(parents=True)  # e.g. a half-copied cache without manifest
    (final / "annotations.json").write_text('{"images": [')
    paths = ensure_synthetic("left", spec, tmp_path)
    assert not leftover.exists()
    assert [p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")] == [final.name]
    assert synthetic._incomplete_reason(final, spec) is None
    assert len(COCO(str(paths.json_file)).getImgIds()) == 6


@pytest.mark.slow
def test_interrupted_generation_then_regeneration(tmp_path):
    """A generator killed mid-way; the next call regenerates cleanly and removes the leftover."""
    spec = ShapesSpec(num_images=400, image_size=64, seed=7)
    proc = run_generator(tmp_path, spec.num_images)
    deadline = time.time() + 120
    leftover = None
    while time.time() < deadline and proc.poll() is None:
        found = [p for p in tmp_path.glob(".tmp-killed-*") if (p / "images").is_dir()
                 and len(os.listdir(p / "images")) >= 3]
        if found:
            leftover = found[0]
            break
        time.sleep(0.02)
    assert leftover is not None, "generator never started writing: " + proc.communicate()[1]
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    final = dataset_dir("killed", spec, tmp_path)
    assert not final.exists() and leftover.exists()
    paths = ensure_synthetic("killed", spec, tmp_path)
    assert not leftover.exists()
    assert list(tmp_path.glob(".tmp-*")) == []
    clean = ensure_synthetic("killed", spec, tmp_path / "clean")
    assert all_files(paths.root) == all_files(clean.root)


@pytest.mark.slow
def test_concurrent_generators_share_one_copy(tmp_path):
    procs = [run_generator(tmp_path, 40) for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    roots = {o[0].strip() for o in outs}
    assert len(roots) == 1
    root = Path(roots.pop())
    assert [p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")] == [root.name]
    # Exactly one generated; the other found the set complete, before or after the lock.
    assert sum("Generating synthetic set" in o[1] for o in outs) == 1
    assert synthetic._incomplete_reason(root, ShapesSpec(num_images=40, image_size=64,
                                                         seed=7)) is None


def test_bad_parameters_are_refused_with_the_reason():
    with pytest.raises(ValueError, match=r"num_classes must be an int in \[1, 5\]"):
        ShapesSpec(num_images=4, num_classes=9)
    with pytest.raises(ValueError, match="image_size must be an int >= 32"):
        ShapesSpec(num_images=4, image_size=8)
