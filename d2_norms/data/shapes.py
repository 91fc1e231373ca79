"""Geometry for the synthetic shapes set: shape polygons, their rasterisation, and exact polygons
of arbitrary pixel masks.

Every mask in the set is produced by pycocotools' own polygon rasteriser (``rasterize``), the
same routine ``COCO.annToMask`` and detectron2's ``polygons_to_bitmask`` use, so the drawn
pixels of an object and the mask decoded from its annotation are the same pixels, not merely
close. For partly hidden objects the visible pixels are turned back into polygons by
``mask_to_polygons``, which follows the pixel edges; pycocotools rasterises those polygons back
to exactly the input pixels (tests/test_data_shapes.py checks this on random masks).
"""
from typing import Dict, List, Sequence, Tuple

import numpy as np
import pycocotools.mask as mask_util

# Class name -> vertex generator. Classes differ by outline only; colours are random per object,
# so a detector has to learn shape, not colour. Order fixes the category ids (1-based).
SHAPE_CLASSES: Tuple[str, ...] = ("circle", "triangle", "square", "star", "cross")


def _unit_circle(rng: np.random.Generator, radius_px: float) -> np.ndarray:
    # Enough vertices that the outline looks round at this radius (about one per 2 px of arc).
    n = int(np.clip(np.pi * radius_px, 16, 64))
    t = np.linspace(0.0, 2.0 * np.pi, n, endpoint=False)
    return np.stack([np.cos(t), np.sin(t)], axis=1)


def _unit_triangle(rng: np.random.Generator, radius_px: float) -> np.ndarray:
    # Near-equilateral: corner angles and radii jittered a little so triangles are not all alike.
    t = np.deg2rad(90.0 + 120.0 * np.arange(3) + rng.uniform(-8.0, 8.0, 3))
    r = rng.uniform(0.9, 1.0, 3)
    return np.stack([r * np.cos(t), r * np.sin(t)], axis=1)


def _unit_square(rng: np.random.Generator, radius_px: float) -> np.ndarray:
    t = np.deg2rad(45.0 + 90.0 * np.arange(4))
    return np.stack([np.cos(t), np.sin(t)], axis=1)


def _unit_star(rng: np.random.Generator, radius_px: float) -> np.ndarray:
    # Five points; inner radius 0.45 keeps the tips at least ~2 px wide at the smallest sizes.
    t = np.deg2rad(90.0 + 36.0 * np.arange(10))
    r = np.where(np.arange(10) % 2 == 0, 1.0, 0.45)
    return np.stack([r * np.cos(t), r * np.sin(t)], axis=1)


def _unit_cross(rng: np.random.Generator, radius_px: float) -> np.ndarray:
    # A plus sign whose arms are 0.4 of its span wide, scaled so its corners lie on the unit circle.
    a, b = 0.2, 1.0
    pts = np.array([(-a, -b), (a, -b), (a, -a), (b, -a), (b, a), (a, a),
                    (a, b), (-a, b), (-a, a), (-b, a), (-b, -a), (-a, -a)])
    return pts / np.hypot(a, b)


_UNIT_SHAPES = {
    "circle": _unit_circle,
    "triangle": _unit_triangle,
    "square": _unit_square,
    "star": _unit_star,
    "cross": _unit_cross,
}


def shape_polygon(name: str, center: Sequence[float], radius: float, angle: float,
                  aspect: float, rng: np.random.Generator) -> np.ndarray:
    """Vertices (N, 2) as (x, y) of shape ``name`` whose unscaled outline has circumradius
    ``radius`` px, stretched by ``aspect`` (x : y) at equal area, rotated by ``angle`` rad."""
    unit = _UNIT_SHAPES[name](rng, radius)
    stretch = np.array([np.sqrt(aspect), 1.0 / np.sqrt(aspect)])
    c, s = np.cos(angle), np.sin(angle)
    rot = np.array([[c, -s], [s, c]])
    return (unit * stretch * radius) @ rot.T + np.asarray(center, dtype=np.float64)


def rasterize(polygons: List[List[float]], height: int, width: int) -> np.ndarray:
    """Union of COCO polygons (flat [x0, y0, x1, y1, ...] lists) as a bool mask, rasterised by
    pycocotools exactly as ``COCO.annToMask`` does."""
    rles = mask_util.frPyObjects([list(map(float, p)) for p in polygons], height, width)
    return mask_util.decode(mask_util.merge(rles)).astype(bool)


def _boundary_edges(mask: np.ndarray) -> Dict[Tuple[int, int], List[Tuple[int, int]]]:
    """Pixel-edge segments between the mask and its outside, directed so that the mask lies on
    the right (image axes: x right, y down). Pixel (row r, col c) is the square
    [c, c+1] x [r, r+1], the convention pycocotools' rasteriser follows."""
    padded = np.pad(mask, 1)
    inside = padded[1:-1, 1:-1]
    out: Dict[Tuple[int, int], List[Tuple[int, int]]] = {}

    def add(rows, cols, start_offset, end_offset):
        for r, c in zip(rows.tolist(), cols.tolist()):
            a = (c + start_offset[0], r + start_offset[1])
            b = (c + end_offset[0], r + end_offset[1])
            out.setdefault(a, []).append(b)

    add(*np.nonzero(inside & ~padded[:-2, 1:-1]), (0, 0), (1, 0))  # top edge, heading +x
    add(*np.nonzero(inside & ~padded[1:-1, 2:]), (1, 0), (1, 1))  # right edge, heading +y
    add(*np.nonzero(inside & ~padded[2:, 1:-1]), (1, 1), (0, 1))  # bottom edge, heading -x
    add(*np.nonzero(inside & ~padded[1:-1, :-2]), (0, 1), (0, 0))  # left edge, heading -y
    return out


def _drop_collinear(loop: List[Tuple[int, int]]) -> np.ndarray:
    pts = np.asarray(loop, dtype=np.int64)
    prev_pts, next_pts = np.roll(pts, 1, axis=0), np.roll(pts, -1, axis=0)
    d_in, d_out = pts - prev_pts, next_pts - pts
    turn = d_in[:, 0] * d_out[:, 1] - d_in[:, 1] * d_out[:, 0]
    return pts[turn != 0]


def signed_area(points: np.ndarray) -> float:
    """Shoelace area; positive for loops that run clockwise on screen (y down), i.e. outlines
    traced by ``mask_to_polygons`` around filled pixels, negative around holes."""
    x, y = points[:, 0], points[:, 1]
    return 0.5 * float(np.sum(x * np.roll(y, -1) - np.roll(x, -1) * y))


def mask_to_loops(mask: np.ndarray) -> List[np.ndarray]:
    """All boundary loops of ``mask`` along pixel edges, each as integer (N, 2) (x, y) corners.

    Where two pixels of the mask touch only at a corner, the walk turns right (towards the
    mask), so such pixels end up in separate loops: regions are 4-connected, and a loop never
    crosses itself. Outer outlines have positive ``signed_area``, holes negative.
    """
    edges = _boundary_edges(np.asarray(mask, dtype=bool))
    loops = []
    while edges:
        first_start = next(iter(edges))
        first_end = edges[first_start].pop(0)
        if not edges[first_start]:
            del edges[first_start]
        loop = [first_start]
        prev, cur = first_start, first_end
        while True:
            heading = (cur[0] - prev[0], cur[1] - prev[1])
            choices = list(edges.get(cur, []))
            if cur == first_start:
                choices.append(first_end)
            # Right turn in y-down axes: heading (dx, dy) -> (-dy, dx).
            right = (cur[0] - heading[1], cur[1] + heading[0])
            nxt = right if right in choices else choices[0]
            if cur == first_start and nxt == first_end:
                break
            edges[cur].remove(nxt)
            if not edges[cur]:
                del edges[cur]
            loop.append(cur)
            prev, cur = cur, nxt
        loops.append(_drop_collinear(loop))
    return loops


def mask_to_polygons(mask: np.ndarray) -> List[List[float]]:
    """COCO polygons (flat lists) whose pycocotools rasterisation is exactly ``mask``.

    COCO polygons cannot express holes (pycocotools unions the polygons of an annotation), so a
    mask with a hole raises ValueError; the generator never produces one.
    """
    loops = mask_to_loops(mask)
    if any(signed_area(loop) < 0 for loop in loops):
        raise ValueError("mask has a hole; COCO polygons cannot represent it")
    return [loop.astype(np.float64).ravel().tolist() for loop in loops]
