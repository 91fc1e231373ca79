"""Synthetic COCO-format instance-segmentation set of coloured shapes, deterministic from a seed.

What an image holds
  A textured background (two-colour gradient, a few low-frequency plane waves, pixel noise) and
  0..``max_objects`` filled shapes of the classes ``SHAPE_CLASSES[:num_classes]``, each with a
  random colour, size (circumdiameter log-uniform in [min_object_size, max_object_size] x image
  size), rotation and mild stretch. A fixed share (``empty_fraction``) of images has no objects.

Occlusion (modal masks, as in COCO)
  Shapes are painted back to front; an annotation describes the part of its shape that is still
  visible. Unoccluded shapes keep their smooth polygon; a partly hidden shape gets the exact
  pixel-edge outline of its visible pixels (``shapes.mask_to_polygons``), possibly several
  polygons. A placement is rejected (and retried elsewhere) when it would leave an earlier shape
  less than ``min_visible_fraction`` visible, with a hole (COCO polygons cannot express holes),
  or with a new fragment smaller than 4 px.

Consistency guarantees
  * ``COCO.annToMask(ann)`` is exactly the set of pixels painted for that object: every
    generation decodes each written annotation with pycocotools and compares it with the painted
    mask (``validate_coco_dataset``). Those pixels are ``fill_rgb`` +- ``object_noise`` per
    channel, and every pixel touching the mask from outside differs from ``fill_rgb`` by more
    than ``object_noise`` in some channel, because each colour is chosen to contrast with
    everything under and around its shape when it is painted (tests check both on the images).
  * ``area`` is the mask's pixel count, ``bbox`` its tight pixel box
    (``pycocotools.mask.toBbox``; a smooth outline may reach < 1 px beyond it), ``iscrowd`` is
    0. Extra per-annotation keys: ``fill_rgb``, ``depth`` (paint order, 0 = back) and
    ``amodal_area`` (pixel count of the whole shape); COCO tools ignore them.

On disk (``ensure_synthetic``)
  ``<root>/<name>-<hash>/`` with ``annotations.json``, ``images/NNNNNN.png`` and
  ``manifest.json`` (written last: spec, hash, annotation sha256, image sizes). ``<root>`` is
  ``$D2_NORMS_CACHE/datasets``, else ``~/.cache/d2_norms/datasets``; ``<hash>`` covers every
  generator parameter and ``GENERATOR_VERSION``. A set is generated in a temporary sibling
  directory and renamed into place only when complete and validated; an exclusive file lock
  makes concurrent processes (e.g. several training ranks) wait for one generator instead of
  racing, and the lock holder removes temporary directories left by killed generators.
"""
import contextlib
import dataclasses
import functools
import hashlib
import json
import logging
import os
import secrets
import shutil
import time
from pathlib import Path
from typing import Dict, Iterator, List, NamedTuple, Optional, Tuple

import cv2
import numpy as np
import pycocotools.mask as mask_util

from .shapes import SHAPE_CLASSES, mask_to_polygons, rasterize, shape_polygon

try:  # POSIX; elsewhere generation relies on the atomic rename alone.
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None

logger = logging.getLogger(__name__)

# Bump whenever the drawing code changes what a spec produces: it is part of the cache hash.
GENERATOR_VERSION = 1
ANNOTATION_FILE = "annotations.json"
IMAGE_DIR = "images"
MANIFEST_FILE = "manifest.json"
_MIN_DIAMETER_PX = 6.0
_MIN_FRAGMENT_PX = 4
_PLACEMENT_ATTEMPTS = 30
_COLOR_CANDIDATES = 64


@dataclasses.dataclass(frozen=True)
class ShapesSpec:
    """Every parameter that determines a generated split (all of them enter the cache hash)."""

    num_images: int
    image_size: int = 128
    num_classes: int = 3
    seed: int = 0
    split: str = "train"
    max_objects: int = 4
    empty_fraction: float = 0.1
    min_object_size: float = 0.125  # circumdiameter / image size
    max_object_size: float = 0.5
    max_aspect: float = 1.25
    min_visible_fraction: float = 0.5
    object_noise: int = 10  # max per-channel deviation of a shape's pixels from its colour
    background_noise: float = 5.0  # std of the background's pixel noise
    # Per-image statistics (the "varied" sets, issue 23). Defaults leave an image exactly as
    # before and stay out of the cache hash, so existing sets keep their directories.
    textures: bool = False  # random background family per image (waves, checks, stripes, blobs)
    brightness: float = 0.0  # per-image shift of every pixel, uniform in [-brightness, brightness]
    contrast: float = 1.0  # per-image gain around 128, log-uniform in [1 / contrast, contrast]

    def __post_init__(self):
        problems = []

        def need(cond: bool, text: str) -> None:
            if not cond:
                problems.append(text)

        need(isinstance(self.num_images, int) and self.num_images >= 1,
             f"num_images must be an int >= 1, got {self.num_images!r}")
        need(isinstance(self.image_size, int) and self.image_size >= 32,
             f"image_size must be an int >= 32 (pixels), got {self.image_size!r}")
        need(isinstance(self.num_classes, int) and 1 <= self.num_classes <= len(SHAPE_CLASSES),
             f"num_classes must be an int in [1, {len(SHAPE_CLASSES)}] (classes: "
             f"{', '.join(SHAPE_CLASSES)}), got {self.num_classes!r}")
        need(isinstance(self.seed, int) and self.seed >= 0,
             f"seed must be an int >= 0, got {self.seed!r}")
        need(isinstance(self.split, str) and self.split != "",
             f"split must be a non-empty string, got {self.split!r}")
        need(isinstance(self.max_objects, int) and self.max_objects >= 1,
             f"max_objects must be an int >= 1, got {self.max_objects!r}")
        need(0.0 <= self.empty_fraction < 1.0,
             f"empty_fraction must be in [0, 1), got {self.empty_fraction!r}")
        need(0.0 < self.min_object_size <= self.max_object_size <= 0.8,
             "object sizes must satisfy 0 < min_object_size <= max_object_size <= 0.8 (fractions "
             f"of image_size), got {self.min_object_size!r}, {self.max_object_size!r}")
        need(self.max_aspect >= 1.0, f"max_aspect must be >= 1, got {self.max_aspect!r}")
        need(0.0 < self.min_visible_fraction <= 1.0,
             f"min_visible_fraction must be in (0, 1], got {self.min_visible_fraction!r}")
        need(isinstance(self.object_noise, int) and 0 <= self.object_noise <= 40,
             f"object_noise must be an int in [0, 40], got {self.object_noise!r}")
        need(0.0 <= self.background_noise <= 20.0,
             f"background_noise must be in [0, 20], got {self.background_noise!r}")
        need(isinstance(self.textures, bool), f"textures must be a bool, got {self.textures!r}")
        need(0.0 <= self.brightness <= 80.0,
             f"brightness must be in [0, 80] (grey levels), got {self.brightness!r}")
        need(1.0 <= self.contrast <= 2.5,
             f"contrast must be in [1, 2.5] (max gain), got {self.contrast!r}")
        if problems:
            raise ValueError("invalid synthetic shapes parameters: " + "; ".join(problems))

    @property
    def class_names(self) -> List[str]:
        return list(SHAPE_CLASSES[: self.num_classes])

    @property
    def min_contrast(self) -> int:
        # L-inf distance between a new colour and every pixel under/around it when painted: it
        # keeps object borders visible and, with the noise on both sides, leaves a margin of
        # >= 24 levels between neighbouring regions (the basis of the pixel tests).
        return 2 * self.object_noise + 24

    def to_dict(self) -> Dict:
        return dataclasses.asdict(self)

    @property
    def varies_statistics(self) -> bool:
        return self.textures or self.brightness > 0 or self.contrast > 1

    def digest(self) -> str:
        # The per-image-statistics fields enter the hash only when set: the sets generated
        # before they existed keep their hash (their images are unchanged).
        fields = self.to_dict()
        for name in _STATISTICS_FIELDS:
            if fields[name] == _STATISTICS_DEFAULTS[name]:
                del fields[name]
        payload = json.dumps({"generator_version": GENERATOR_VERSION, **fields}, sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()


_STATISTICS_DEFAULTS = {"textures": False, "brightness": 0.0, "contrast": 1.0}
_STATISTICS_FIELDS = tuple(_STATISTICS_DEFAULTS)


class SyntheticPaths(NamedTuple):
    root: Path  # the dataset directory
    json_file: Path
    image_root: Path


class ShapeInstance(NamedTuple):
    category_id: int  # 1-based, index into SHAPE_CLASSES + 1
    polygons: List[List[float]]  # COCO polygons of the visible part
    mask: np.ndarray  # bool HxW, visible pixels
    fill_rgb: Tuple[int, int, int]
    depth: int
    amodal_area: int


# --------------------------------------------------------------------------------------------
# Drawing
# --------------------------------------------------------------------------------------------
def _split_code(split: str) -> int:
    return int.from_bytes(hashlib.sha256(split.encode()).digest()[:4], "little")


def _image_rng(spec: ShapesSpec, index: int) -> np.random.Generator:
    # One independent stream per image: any image can be regenerated on its own.
    return np.random.default_rng([spec.seed, _split_code(spec.split), 0, index])


@functools.lru_cache(maxsize=16)
def _empty_set(spec: "ShapesSpec") -> frozenset:
    return frozenset(empty_image_indices(spec).tolist())


def empty_image_indices(spec: ShapesSpec) -> np.ndarray:
    """Indices of the images drawn without objects: round(empty_fraction * num_images) of them,
    spread by the seed."""
    count = int(round(spec.empty_fraction * spec.num_images))
    rng = np.random.default_rng([spec.seed, _split_code(spec.split), 1])
    return np.sort(rng.permutation(spec.num_images)[:count])


def _background(rng: np.random.Generator, size: int, noise_std: float) -> np.ndarray:
    coords = (np.arange(size, dtype=np.float32) + 0.5) / size
    yy, xx = coords[:, None], coords[None, :]
    c0, c1 = rng.uniform(60, 195, (2, 3)).astype(np.float32)
    theta = rng.uniform(0, 2 * np.pi)
    ramp = xx * np.float32(np.cos(theta)) + yy * np.float32(np.sin(theta))
    ramp = (ramp - ramp.min()) / max(float(ramp.max() - ramp.min()), 1e-6)
    img = c0 + (c1 - c0) * ramp[..., None]
    for _ in range(3):  # low-frequency texture: plane waves of 1-4 periods per image
        freq = rng.uniform(1.0, 4.0)
        phi = rng.uniform(0, 2 * np.pi)
        phase = rng.uniform(0, 2 * np.pi)
        amp = rng.uniform(3.0, 12.0, 3).astype(np.float32)
        arg = (xx * np.float32(2 * np.pi * freq * np.cos(phi))
               + yy * np.float32(2 * np.pi * freq * np.sin(phi)) + np.float32(phase))
        img += amp * np.sin(arg)[..., None]
    img += rng.standard_normal(img.shape, dtype=np.float32) * np.float32(noise_std)
    return np.clip(np.rint(img), 30, 225).astype(np.int16)


class Photometric(NamedTuple):
    """One image's brightness shift and contrast gain: x -> gain * (x - 128) + 128 + shift."""

    shift: float
    gain: float

    def apply(self, values: np.ndarray) -> np.ndarray:
        return np.float32(self.gain) * (values - np.float32(128)) + np.float32(128 + self.shift)


def _statistics_rng(spec: ShapesSpec, index: int) -> np.random.Generator:
    # Its own stream: the default sets (which never draw from it) keep every image unchanged.
    return np.random.default_rng([spec.seed, _split_code(spec.split), 2, index])


def _photometric(rng: np.random.Generator, spec: ShapesSpec) -> Photometric:
    shift = float(rng.uniform(-spec.brightness, spec.brightness)) if spec.brightness else 0.0
    log_c = np.log(spec.contrast)
    gain = float(np.exp(rng.uniform(-log_c, log_c))) if spec.contrast > 1 else 1.0
    return Photometric(shift, gain)


TEXTURES = ("waves", "checks", "stripes", "blobs")


def _textured_background(rng: np.random.Generator, size: int, noise_std: float,
                         photo: Photometric) -> Tuple[np.ndarray, str]:
    """A background of a random family (``TEXTURES``), random colours, random pixel noise (0-2x
    ``noise_std``), then the image's brightness / contrast; values in [0, 255]."""
    kind = TEXTURES[int(rng.integers(len(TEXTURES)))]
    coords = (np.arange(size, dtype=np.float32) + 0.5) / size
    yy, xx = coords[:, None], coords[None, :]
    c0, c1 = rng.uniform(30, 225, (2, 3)).astype(np.float32)
    if kind == "waves":
        img = _background(rng, size, 0.0).astype(np.float32)
    elif kind == "checks":
        cell = float(rng.uniform(4, 24))
        theta = rng.uniform(0, np.pi / 2)
        u = (xx * np.cos(theta) + yy * np.sin(theta)) * size / cell
        v = (-xx * np.sin(theta) + yy * np.cos(theta)) * size / cell
        pick = ((np.floor(u) + np.floor(v)) % 2).astype(np.float32)
        img = c0 + (c1 - c0) * pick[..., None]
    elif kind == "stripes":
        freq = rng.uniform(3.0, 16.0)
        theta = rng.uniform(0, np.pi)
        arg = 2 * np.pi * freq * (xx * np.cos(theta) + yy * np.sin(theta)) + rng.uniform(0, 6.3)
        img = c0 + (c1 - c0) * (0.5 + 0.5 * np.sin(arg, dtype=np.float32))[..., None]
    else:  # blobs: low-resolution colour noise, upsampled
        cells = int(rng.integers(3, 9))
        low = rng.uniform(30, 225, (cells, cells, 3)).astype(np.float32)
        img = cv2.resize(low, (size, size), interpolation=cv2.INTER_CUBIC)
    img = img + rng.standard_normal(img.shape, dtype=np.float32) * np.float32(
        rng.uniform(0, 2 * noise_std))
    img = photo.apply(np.clip(img, 30, 225).astype(np.float32))
    return np.clip(np.rint(img), 0, 255).astype(np.int16), kind


def _fill_range(spec: ShapesSpec, photo: Optional[Photometric]) -> Tuple[int, int]:
    """Object colours: [object_noise, 255 - object_noise], through the image's photometric map
    (a dark / low-contrast image has dark / low-contrast objects too)."""
    lo, hi = spec.object_noise, 255 - spec.object_noise
    if photo is None:
        return lo, hi
    a, b = (float(v) for v in photo.apply(np.array([lo, hi], np.float32)))
    return int(np.clip(np.ceil(a), lo, hi)), int(np.clip(np.floor(b), lo, hi))


def _pick_fill(rng: np.random.Generator, canvas: np.ndarray, region: np.ndarray,
               spec: ShapesSpec, fill_range: Optional[Tuple[int, int]] = None
               ) -> Optional[np.ndarray]:
    """A colour at L-inf distance >= min_contrast from every canvas pixel in ``region``."""
    pixels = canvas[region].astype(np.int32)  # (n, 3)
    lo, hi = fill_range or (spec.object_noise, 255 - spec.object_noise)
    candidates = rng.integers(lo, hi + 1, (_COLOR_CANDIDATES, 3))
    corners = np.array([[(k >> b & 1) * (hi - lo) + lo for b in range(3)] for k in range(8)])
    # Small batches: the first few random candidates nearly always pass.
    for group in [candidates[i:i + 8] for i in range(0, _COLOR_CANDIDATES, 8)] + [corners]:
        dist = np.abs(pixels[None, :, :] - group[:, None, :]).max(axis=2).min(axis=1)
        ok = np.nonzero(dist >= spec.min_contrast)[0]
        if ok.size:
            return group[ok[0]].astype(np.int16)
    return None


def _count_small_fragments(mask: np.ndarray) -> int:
    n, _, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=4)
    return int(np.sum(stats[1:, cv2.CC_STAT_AREA] < _MIN_FRAGMENT_PX))


def _has_hole(mask: np.ndarray) -> bool:
    # Regions are 4-connected (see shapes.mask_to_loops), so the outside is 8-connected: any
    # 8-connected background component other than the one around the padded border is a hole.
    outside = np.pad(~mask, 1, constant_values=True).astype(np.uint8)
    n, _ = cv2.connectedComponents(outside, connectivity=8)
    return n > 2


def _occlusion_ok(old_visible: np.ndarray, new_visible: np.ndarray, amodal_area: int,
                  spec: ShapesSpec) -> bool:
    if new_visible.sum() < spec.min_visible_fraction * amodal_area:
        return False
    if _has_hole(new_visible):
        return False
    return _count_small_fragments(new_visible) <= _count_small_fragments(old_visible)


def draw_image(spec: ShapesSpec, index: int) -> Tuple[np.ndarray, List[ShapeInstance]]:
    """Image ``index`` of the split (RGB uint8 HxWx3) and its instances, back to front."""
    rng = _image_rng(spec, index)
    size = spec.image_size
    photo = None
    if spec.varies_statistics:
        stats_rng = _statistics_rng(spec, index)
        photo = _photometric(stats_rng, spec)
        if spec.textures:
            canvas, _ = _textured_background(stats_rng, size, spec.background_noise, photo)
        else:
            canvas = _background(rng, size, spec.background_noise)
            canvas = np.clip(np.rint(photo.apply(canvas.astype(np.float32))), 0, 255
                             ).astype(np.int16)
    else:
        canvas = _background(rng, size, spec.background_noise)
    fill_range = _fill_range(spec, photo)
    is_empty = index in _empty_set(spec)
    num_objects = 0 if is_empty else int(rng.integers(1, spec.max_objects + 1))
    kernel = np.ones((3, 3), np.uint8)
    min_d = max(_MIN_DIAMETER_PX, spec.min_object_size * size)
    max_d = max(min_d, spec.max_object_size * size)

    placed = []  # dicts: category_id, polygon, full, visible, fill, amodal_area
    for _ in range(num_objects):
        category_id = int(rng.integers(1, spec.num_classes + 1))
        name = SHAPE_CLASSES[category_id - 1]
        for _attempt in range(_PLACEMENT_ATTEMPTS):
            radius = 0.5 * float(np.exp(rng.uniform(np.log(min_d), np.log(max_d))))
            angle = float(rng.uniform(0, 2 * np.pi))
            aspect = float(np.exp(rng.uniform(-np.log(spec.max_aspect), np.log(spec.max_aspect))))
            pts = shape_polygon(name, (0.0, 0.0), radius, angle, aspect, rng)
            # Keep the whole shape inside the image (1 px margin), then round the coordinates:
            # the rounded polygon is both what is stored and what is painted.
            lo = 1.0 - pts.min(axis=0)
            hi = size - 1.0 - pts.max(axis=0)
            if np.any(hi < lo):
                continue
            pts = np.round(pts + rng.uniform(lo, hi), 2)
            polygon = pts.ravel().tolist()
            full = rasterize([polygon], size, size)
            amodal_area = int(full.sum())
            if amodal_area < 0.25 * min_d * min_d:
                continue
            covered = [(p, p["visible"] & ~full) for p in placed if (p["visible"] & full).any()]
            if not all(_occlusion_ok(p["visible"], vis, p["amodal_area"], spec)
                       for p, vis in covered):
                continue
            fill = _pick_fill(rng, canvas, cv2.dilate(full.astype(np.uint8), kernel) > 0, spec,
                              fill_range)
            if fill is None:
                continue
            for p, vis in covered:
                p["visible"] = vis
            noise = rng.integers(-spec.object_noise, spec.object_noise + 1, (amodal_area, 3))
            canvas[full] = fill[None, :] + noise
            placed.append(dict(category_id=category_id, polygon=polygon, full=full,
                               visible=full.copy(), fill=fill, amodal_area=amodal_area))
            break

    instances = []
    for depth, p in enumerate(placed):
        occluded = not np.array_equal(p["visible"], p["full"])
        polygons = mask_to_polygons(p["visible"]) if occluded else [p["polygon"]]
        instances.append(ShapeInstance(
            category_id=p["category_id"], polygons=polygons, mask=p["visible"],
            fill_rgb=tuple(int(v) for v in p["fill"]), depth=depth,
            amodal_area=p["amodal_area"]))
    return canvas.astype(np.uint8), instances


# --------------------------------------------------------------------------------------------
# Writing and validating a COCO set
# --------------------------------------------------------------------------------------------
def _write_bytes(path: Path, data: bytes, sync: bool = False) -> None:
    with open(path, "wb") as f:
        f.write(data)
        if sync:
            f.flush()
            os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):  # not possible on every platform / file system
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_coco_dataset(spec: ShapesSpec, out_dir: Path, name: str = "synthetic_shapes"
                       ) -> Dict[int, List[np.ndarray]]:
    """Draw every image of ``spec`` into ``out_dir`` (PNG + COCO json, no manifest).

    Returns {annotation id: visible mask} so that the caller can check the written annotations
    against the painted pixels."""
    out_dir = Path(out_dir)
    (out_dir / IMAGE_DIR).mkdir(parents=True, exist_ok=True)
    images, annotations, masks = [], [], {}
    for index in range(spec.num_images):
        rgb, instances = draw_image(spec, index)
        file_name = f"{index:06d}.png"
        ok, png = cv2.imencode(".png", rgb[:, :, ::-1], [cv2.IMWRITE_PNG_COMPRESSION, 3])
        if not ok:
            raise RuntimeError(f"PNG encoding failed for image {index} of {name}")
        _write_bytes(out_dir / IMAGE_DIR / file_name, png.tobytes())
        image_id = index + 1
        images.append({"id": image_id, "file_name": file_name, "width": spec.image_size,
                       "height": spec.image_size})
        for inst in instances:
            rle = mask_util.encode(np.asfortranarray(inst.mask.astype(np.uint8)))
            ann_id = len(annotations) + 1
            annotations.append({
                "id": ann_id,
                "image_id": image_id,
                "category_id": inst.category_id,
                "segmentation": inst.polygons,
                "area": int(mask_util.area(rle)),
                "bbox": [float(v) for v in mask_util.toBbox(rle)],
                "iscrowd": 0,
                "fill_rgb": list(inst.fill_rgb),
                "depth": inst.depth,
                "amodal_area": inst.amodal_area,
            })
            masks[ann_id] = inst.mask
    coco = {
        "info": {"description": f"d2_norms synthetic shapes: {name}",
                 "version": str(GENERATOR_VERSION), "spec": spec.to_dict()},
        "licenses": [],
        "images": images,
        "annotations": annotations,
        "categories": [{"id": i + 1, "name": n, "supercategory": "shape"}
                       for i, n in enumerate(spec.class_names)],
    }
    _write_bytes(out_dir / ANNOTATION_FILE,
                 json.dumps(coco, sort_keys=True, separators=(",", ":")).encode(), sync=True)
    return masks


def validate_coco_dataset(json_file: Path, image_root: Path,
                          expected_masks: Optional[Dict[int, np.ndarray]] = None) -> Dict:
    """Load the set with pycocotools and check every annotation: polygon segmentation that
    ``annToMask`` decodes, area == mask pixel count, bbox == the mask's tight box, iscrowd 0,
    known image/category ids, image files present with the listed size; optionally masks equal
    to ``expected_masks``. Raises RuntimeError naming the first inconsistency; returns counts."""
    import contextlib as _cl
    import io

    from PIL import Image
    from pycocotools.coco import COCO

    with _cl.redirect_stdout(io.StringIO()):
        coco = COCO(str(json_file))
    cat_ids = set(coco.getCatIds())
    for img in coco.dataset["images"]:
        path = Path(image_root) / img["file_name"]
        with Image.open(path) as im:
            if im.size != (img["width"], img["height"]):
                raise RuntimeError(f"{path}: size {im.size} but json says "
                                   f"{(img['width'], img['height'])}")
    for ann in coco.dataset["annotations"]:
        where = f"{json_file}: annotation {ann['id']}"
        segm = ann["segmentation"]
        if not (isinstance(segm, list) and segm and all(len(p) >= 6 and len(p) % 2 == 0
                                                       for p in segm)):
            raise RuntimeError(f"{where}: segmentation is not a list of polygons")
        if ann["iscrowd"] != 0 or ann["category_id"] not in cat_ids:
            raise RuntimeError(f"{where}: iscrowd must be 0 and category_id known")
        mask = coco.annToMask(ann).astype(bool)
        rle = mask_util.encode(np.asfortranarray(mask.astype(np.uint8)))
        if ann["area"] != int(mask.sum()):
            raise RuntimeError(f"{where}: area {ann['area']} != mask pixels {int(mask.sum())}")
        if list(ann["bbox"]) != [float(v) for v in mask_util.toBbox(rle)]:
            raise RuntimeError(f"{where}: bbox {ann['bbox']} is not the mask's box")
        if expected_masks is not None and not np.array_equal(mask, expected_masks[ann["id"]]):
            raise RuntimeError(f"{where}: decoded polygon differs from the painted pixels")
    return {"images": len(coco.dataset["images"]),
            "annotations": len(coco.dataset["annotations"]),
            "categories": len(cat_ids)}


# --------------------------------------------------------------------------------------------
# Cache: location, completeness check, atomic creation
# --------------------------------------------------------------------------------------------
def default_cache_dir() -> Path:
    """``$D2_NORMS_CACHE`` if set, else ``~/.cache/d2_norms``."""
    env = os.environ.get("D2_NORMS_CACHE")
    return Path(env).expanduser() if env else Path("~/.cache/d2_norms").expanduser()


def default_dataset_root() -> Path:
    return default_cache_dir() / "datasets"


def dataset_dir(name: str, spec: ShapesSpec, root: Optional[os.PathLike] = None) -> Path:
    root = Path(root).expanduser() if root is not None else default_dataset_root()
    return root.absolute() / f"{name}-{spec.digest()[:12]}"


def _paths(directory: Path) -> SyntheticPaths:
    return SyntheticPaths(directory, directory / ANNOTATION_FILE, directory / IMAGE_DIR)


def _incomplete_reason(directory: Path, spec: ShapesSpec) -> Optional[str]:
    """None when ``directory`` holds the complete set of ``spec``, else why not."""
    manifest_path = directory / MANIFEST_FILE
    if not manifest_path.is_file():
        return "no manifest" if directory.exists() else "not generated yet"
    try:
        manifest = json.loads(manifest_path.read_text())
    except (OSError, ValueError) as e:
        return f"unreadable manifest ({e})"
    if manifest.get("digest") != spec.digest():
        return "manifest is for other parameters"
    json_file = directory / ANNOTATION_FILE
    if not json_file.is_file() or _sha256(json_file) != manifest.get("annotations_sha256"):
        return f"{ANNOTATION_FILE} missing or changed"
    image_sizes = manifest.get("image_bytes", {})
    if len(image_sizes) != spec.num_images:
        return "manifest lists the wrong number of images"
    for file_name, nbytes in image_sizes.items():
        try:
            if (directory / IMAGE_DIR / file_name).stat().st_size != nbytes:
                return f"image {file_name} changed"
        except OSError:
            return f"image {file_name} missing"
    return None


@contextlib.contextmanager
def _exclusive_lock(lock_path: Path) -> Iterator[None]:
    if fcntl is None:  # pragma: no cover
        yield
        return
    with open(lock_path, "a+") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


_VERIFIED: Dict[Path, float] = {}  # dataset dir -> manifest mtime verified in this process


def ensure_synthetic(name: str, spec: ShapesSpec, root: Optional[os.PathLike] = None
                     ) -> SyntheticPaths:
    """Paths of the generated split, generating it first when the cache lacks a complete copy.

    Safe against kills (nothing is visible before the final rename; leftovers are removed by the
    next generator) and against concurrent callers (an exclusive lock per set)."""
    final = dataset_dir(name, spec, root)
    manifest = final / MANIFEST_FILE
    with contextlib.suppress(OSError):
        if _VERIFIED.get(final) == manifest.stat().st_mtime:
            return _paths(final)
    reason = _incomplete_reason(final, spec)
    if reason is None:
        _VERIFIED[final] = manifest.stat().st_mtime
        return _paths(final)

    parent = final.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        lock = _exclusive_lock(parent / f".{final.name}.lock")
        lock.__enter__()
    except OSError as e:
        raise OSError(
            f"cannot write the synthetic dataset '{name}' under {parent}: {e}. Set D2_NORMS_CACHE "
            "to a writable directory (datasets go to $D2_NORMS_CACHE/datasets) or pass root= to "
            "d2_norms.data.register_synthetic") from e
    try:
        reason = _incomplete_reason(final, spec)  # another process may have finished it
        if reason is None:
            _VERIFIED[final] = manifest.stat().st_mtime
            return _paths(final)
        # We hold the lock, so temporary directories of this set belong to dead generators.
        for leftover in parent.glob(f".tmp-{final.name}-*"):
            logger.info("Removing leftover of an interrupted generation: %s", leftover)
            shutil.rmtree(leftover, ignore_errors=True)
        if reason != "not generated yet":
            logger.warning("Cached synthetic set %s is unusable (%s); regenerating it.", final,
                           reason)
        tmp = parent / f".tmp-{final.name}-{os.getpid()}-{secrets.token_hex(4)}"
        start = time.perf_counter()
        logger.info("Generating synthetic set '%s' (%d images of %d px) in %s", name,
                    spec.num_images, spec.image_size, final)
        try:
            tmp.mkdir()
            masks = write_coco_dataset(spec, tmp, name)
            counts = validate_coco_dataset(tmp / ANNOTATION_FILE, tmp / IMAGE_DIR, masks)
            manifest_data = {
                "format": "d2_norms synthetic shapes",
                "name": name,
                "generator_version": GENERATOR_VERSION,
                "spec": spec.to_dict(),
                "digest": spec.digest(),
                "annotations_sha256": _sha256(tmp / ANNOTATION_FILE),
                "image_bytes": {p.name: p.stat().st_size
                                for p in sorted((tmp / IMAGE_DIR).iterdir())},
                **{f"num_{k}": v for k, v in counts.items()},
            }
            _write_bytes(tmp / MANIFEST_FILE,
                         json.dumps(manifest_data, indent=1, sort_keys=True).encode(), sync=True)
            _fsync_dir(tmp)
            if final.exists():  # an incomplete or stale copy: move it out of the way first
                trash = parent / f".tmp-{final.name}-stale-{secrets.token_hex(4)}"
                os.rename(final, trash)
                shutil.rmtree(trash, ignore_errors=True)
            os.rename(tmp, final)
            _fsync_dir(parent)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        logger.info("Synthetic set '%s' ready: %d images, %d annotations (%.1f s)", name,
                    counts["images"], counts["annotations"], time.perf_counter() - start)
        _VERIFIED[final] = manifest.stat().st_mtime
        return _paths(final)
    finally:
        lock.__exit__(None, None, None)
