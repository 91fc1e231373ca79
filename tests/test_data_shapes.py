"""Geometry of the synthetic set: pixel-exact polygons and shape outlines, against pycocotools."""
import numpy as np
import pycocotools.mask as mask_util
import pytest

import d2_norms  # noqa: F401  (shims)
from d2_norms.data.shapes import (SHAPE_CLASSES, mask_to_loops, mask_to_polygons, rasterize,
                                  shape_polygon, signed_area)

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")


def coco_decode(polygons, h, w):
    """What COCO.annToMask does for a polygon annotation."""
    return mask_util.decode(mask_util.merge(mask_util.frPyObjects(polygons, h, w))).astype(bool)


def has_hole(mask):
    # Flood the 8-connected outside from the border; any background left unreached is a hole.
    import cv2

    outside = np.pad(~mask, 1, constant_values=True).astype(np.uint8)
    n, _ = cv2.connectedComponents(outside, connectivity=8)
    return n > 2


def test_mask_to_polygons_is_exact_for_random_masks():
    rng = np.random.default_rng(123)
    compared = 0
    for _ in range(600):
        h, w = rng.integers(2, 24, 2)
        mask = rng.random((h, w)) < rng.uniform(0.15, 0.85)
        if not mask.any() or has_hole(mask):
            continue
        polygons = mask_to_polygons(mask)
        assert all(len(p) >= 8 and len(p) % 2 == 0 for p in polygons)
        np.testing.assert_array_equal(coco_decode(polygons, h, w), mask)
        compared += 1
    assert compared > 200


def test_diagonal_pixels_are_separate_loops_and_holes_are_refused():
    mask = np.zeros((4, 4), bool)
    mask[0, 0] = mask[1, 1] = True  # touch at one corner only
    loops = mask_to_loops(mask)
    assert len(loops) == 2 and all(signed_area(l) == 1.0 for l in loops)
    ring = np.ones((5, 5), bool)
    ring[2, 2] = False
    assert sorted(signed_area(l) for l in mask_to_loops(ring)) == [-1.0, 25.0]
    with pytest.raises(ValueError, match="hole"):
        mask_to_polygons(ring)


@pytest.mark.parametrize("name,area_over_r2", [("circle", np.pi), ("square", 2.0),
                                               ("cross", None), ("star", None)])
def test_shape_areas_match_geometry(name, area_over_r2):
    rng = np.random.default_rng(0)
    r = 20.0
    poly = shape_polygon(name, (32.0, 32.0), r, 0.3, 1.0, rng)
    x, y = poly[:, 0], poly[:, 1]
    shoelace = 0.5 * abs(np.sum(x * np.roll(y, -1) - np.roll(x, -1) * y))
    if area_over_r2 is not None:  # circle as a polygon of >= 16 sides; square of diagonal 2r
        assert shoelace == pytest.approx(area_over_r2 * r * r, rel=0.03)
    raster = rasterize([poly.ravel().tolist()], 64, 64)
    # Rasterised area agrees with the polygon area up to the boundary pixels.
    assert abs(raster.sum() - shoelace) < 0.1 * shoelace
    # The outline stays within the circumcircle.
    assert np.all(np.hypot(x - 32, y - 32) <= r + 1e-9)


def test_stretch_keeps_area_and_classes_are_distinct():
    rng = np.random.default_rng(0)
    a = shape_polygon("square", (0, 0), 10.0, 0.0, 1.0, rng)
    b = shape_polygon("square", (0, 0), 10.0, 0.0, 1.25, rng)
    area = lambda p: 0.5 * abs(np.sum(p[:, 0] * np.roll(p[:, 1], -1) - np.roll(p[:, 0], -1)
                                      * p[:, 1]))
    assert area(b) == pytest.approx(area(a))
    assert np.ptp(b[:, 0]) / np.ptp(b[:, 1]) == pytest.approx(1.25)
    assert len(set(SHAPE_CLASSES)) == len(SHAPE_CLASSES) >= 3
