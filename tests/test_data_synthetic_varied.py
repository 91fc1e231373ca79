"""The varied synthetic set (issue 23's batch study): per-image statistics that really vary,
deterministic generation, the shapes set's pixel guarantees kept, the old sets unchanged."""
import hashlib

import cv2
import numpy as np
import pytest
from detectron2.data import DatasetCatalog, MetadataCatalog
from pycocotools.coco import COCO

import d2_norms  # noqa: F401  (shims)
from d2_norms.data import VARIED_OPTIONS, VARIED_PREFIX, VARIED_SIZES, synthetic
from d2_norms.data.synthetic import ShapesSpec, ensure_synthetic

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

SPEC = ShapesSpec(num_images=48, image_size=96, seed=3, **VARIED_OPTIONS)
PLAIN = ShapesSpec(num_images=48, image_size=96, seed=3)


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
    root = tmp_path_factory.mktemp("varied")
    return ensure_synthetic("varied_test", SPEC, root)


def load_rgb(path):
    return cv2.imread(str(path), cv2.IMREAD_UNCHANGED)[:, :, ::-1].astype(np.int32)


def per_image_stats(spec):
    images = [synthetic.draw_image(spec, i)[0].astype(np.float64) for i in range(spec.num_images)]
    return np.array([im.mean() for im in images]), np.array([im.std() for im in images])


def test_per_image_mean_and_std_vary_much_more_than_the_plain_set():
    # Measured (48 images of 96 px, seed 3): spread (std) of the per-image means 34.9 grey levels
    # against 12.9 for the plain set; per-image std p90 / p10 2.78 against 1.90, and the std of the
    # per-image stds 18.4 against 8.2. At 160 px over 200 images: 32.3 / 16.8 and 3.19 / 1.78.
    means, stds = per_image_stats(SPEC)
    plain_means, plain_stds = per_image_stats(PLAIN)
    assert means.std() > 25 and means.std() > 2 * plain_means.std()
    ratio = np.percentile(stds, 90) / np.percentile(stds, 10)
    plain_ratio = np.percentile(plain_stds, 90) / np.percentile(plain_stds, 10)
    assert ratio > 2.3 and ratio > 1.3 * plain_ratio
    assert stds.std() > 1.8 * plain_stds.std()
    # dark and bright, flat and contrasted images both occur
    assert means.min() < 90 and means.max() > 165


def test_every_background_family_and_the_photometric_ranges_occur():
    kinds, gains, shifts = [], [], []
    for i in range(SPEC.num_images):
        rng = synthetic._statistics_rng(SPEC, i)  # the order draw_image draws in
        photo = synthetic._photometric(rng, SPEC)
        kinds.append(synthetic._textured_background(rng, 32, 5.0, photo)[1])
        gains.append(photo.gain)
        shifts.append(photo.shift)
    assert set(kinds) == set(synthetic.TEXTURES)
    assert min(gains) >= 0.5 and max(gains) <= 2.0 and min(gains) < 0.7 and max(gains) > 1.4
    assert min(shifts) >= -50 and max(shifts) <= 50 and min(shifts) < -30 and max(shifts) > 30


def test_generation_is_deterministic_and_valid(generated, tmp_path):
    again = ensure_synthetic("varied_test", SPEC, tmp_path / "again")
    for a, b in zip(sorted(generated.image_root.iterdir()), sorted(again.image_root.iterdir())):
        assert a.read_bytes() == b.read_bytes(), a.name
    assert again.json_file.read_bytes() == generated.json_file.read_bytes()
    other = synthetic.draw_image(ShapesSpec(num_images=48, image_size=96, seed=4,
                                            **VARIED_OPTIONS), 1)[0]
    assert not np.array_equal(other, load_rgb(generated.image_root / "000001.png"))
    # nearly as many objects as the plain set (measured: 92 against 108 here at 96 px; 2.25
    # against 2.27 per image over 200 images of 160 px): room is left for contrasting colours
    coco = COCO(str(generated.json_file))
    plain = sum(len(synthetic.draw_image(PLAIN, i)[1]) for i in range(PLAIN.num_images))
    assert len(coco.dataset["annotations"]) >= 0.8 * plain


def test_masks_are_the_pixels_painted_in_the_object_colour_and_contrast_with_around(generated):
    coco = COCO(str(generated.json_file))
    noise = SPEC.object_noise
    kernel = np.ones((3, 3), np.uint8)
    for image_id in coco.getImgIds():
        rgb = load_rgb(generated.image_root / coco.imgs[image_id]["file_name"])
        for a in coco.loadAnns(coco.getAnnIds(imgIds=[image_id])):
            m = coco.annToMask(a).astype(bool)
            dev = np.abs(rgb - np.array(a["fill_rgb"])).max(axis=2)
            assert dev[m].max() <= noise
            ring = cv2.dilate(m.astype(np.uint8), kernel).astype(bool) & ~m
            assert dev[ring].min() > noise


def test_the_plain_sets_are_unchanged():
    # Digest and image of the plain set, computed with the generator before the varied fields
    # existed: the default fields stay out of the hash and never draw random numbers.
    assert ShapesSpec(num_images=1000).digest() == (
        "7c98f8c65f4893a78332d3f60ab2301148a5286d2ba7c7a6cb392bb076e2b97e")
    image = synthetic.draw_image(ShapesSpec(num_images=4, image_size=64, seed=3), 1)[0]
    assert hashlib.sha256(image.tobytes()).hexdigest() == (
        "734bdbe00bfe07211d423061e6f29dd9140bbf1bfccb888de02a91fb35fa8111")
    assert SPEC.digest() != ShapesSpec(num_images=48, image_size=96, seed=3,
                                       textures=True).digest()


def test_registered_names_and_bad_values():
    for split, n in (("train", VARIED_SIZES["num_train"]), ("val", VARIED_SIZES["num_val"])):
        name = f"{VARIED_PREFIX}_{split}"
        assert name in DatasetCatalog.list()
        spec = MetadataCatalog.get(name).synthetic_spec
        assert spec["num_images"] == n and spec["image_size"] == 160
        assert {k: spec[k] for k in VARIED_OPTIONS} == VARIED_OPTIONS
    assert VARIED_SIZES["num_val"] >= 500
    with pytest.raises(ValueError, match="contrast"):
        ShapesSpec(num_images=4, contrast=0.5)
    with pytest.raises(ValueError, match="brightness"):
        ShapesSpec(num_images=4, brightness=-1.0)
