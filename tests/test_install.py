"""The install result: a real detectron2 distribution, the compatibility shims, the installer's
hash pin."""
import hashlib
import importlib
import importlib.metadata
import os
import subprocess
import sys
import tarfile

import numpy as np
import pytest

import d2_norms
from d2_norms import compat

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PINNED = "5d2e9e51e523ec72f6a31cca04b0a515492e9514b773a3d134cedc0677170b29"


def test_detectron2_is_an_installed_distribution():
    import detectron2

    assert detectron2.__version__.startswith("0.6") or importlib.util.find_spec("detectron2._C")
    dists = {d.metadata["Name"].lower() for d in importlib.metadata.distributions()}
    assert "pb1-detectron2" in dists or "detectron2" in dists
    files = importlib.metadata.files("pb1-detectron2" if "pb1-detectron2" in dists else "detectron2")
    assert any(str(f).endswith("detectron2/modeling/meta_arch/retinanet.py") for f in files)


def test_torch_is_the_pinned_build():
    import torch
    import torchvision

    assert torch.__version__.split("+")[0] == "2.14.1"
    assert torchvision.__version__.split("+")[0] == "0.29.1"


def test_c_extension_placeholder_behaves_like_a_module():
    from detectron2 import _C

    if not getattr(_C, "d2_norms_placeholder", False):
        pytest.skip("full detectron2 with compiled ops: no placeholder")
    # Ops of the extension exist (so `from detectron2 import _C` users import fine) ...
    assert hasattr(_C, "deform_conv_forward")
    # ... unknown names raise AttributeError, so hasattr/getattr(default) work.
    assert not hasattr(_C, "no_such_op")
    assert getattr(_C, "no_such_op", 42) == 42
    with pytest.raises(AttributeError):
        _C.__wrapped__
    for name, feature in [("deform_conv_forward", "deformable"),
                          ("box_iou_rotated", "rotated box IoU"),
                          ("COCOevalAccumulate", "fast COCO evaluation")]:
        with pytest.raises(compat.MissingCompiledOpError, match=feature) as info:
            getattr(_C, name)(1, 2)
        assert name in str(info.value)


def test_modules_that_import_c_at_top_level_import():
    import detectron2.evaluation.fast_eval_api  # noqa: F401
    import detectron2.layers.deform_conv  # noqa: F401
    import detectron2.layers.rotated_boxes as rb
    import torch

    from detectron2 import _C

    if getattr(_C, "d2_norms_placeholder", False):
        with pytest.raises(compat.MissingCompiledOpError, match="rotated box IoU"):
            rb.pairwise_iou_rotated(torch.zeros(1, 5), torch.zeros(1, 5))


def test_pillow_linear_alias():
    from PIL import Image

    assert Image.LINEAR == Image.BILINEAR
    from detectron2.data.transforms import ExtentTransform

    ExtentTransform((0, 0, 4, 4), (4, 4))  # default interp=Image.LINEAR must resolve


def test_model_zoo_imports_and_pkg_resources_resolves_files():
    import detectron2.model_zoo  # noqa: F401  (imports pkg_resources at module top)
    import pkg_resources

    path = pkg_resources.resource_filename("detectron2", "__init__.py")
    assert os.path.isfile(path)


def test_numpy_aliases_for_v06_bitmasks():
    import torch
    from detectron2.structures import BitMasks, PolygonMasks

    assert np.float is float and np.int is int
    poly = PolygonMasks([[np.array([0, 0, 8, 0, 8, 8, 0, 8], dtype=np.float64)]])
    masks = BitMasks.from_polygon_masks(poly, 10, 10)
    assert masks.tensor.shape == (1, 10, 10) and masks.tensor.dtype == torch.bool
    # structures/masks.py takes the np.bool path for an object without polygons
    from detectron2.structures.masks import polygons_to_bitmask

    empty = polygons_to_bitmask([], 5, 5)
    assert empty.shape == (5, 5) and not empty.any()


def test_compat_is_idempotent_and_reports():
    first = compat.apply()
    second = compat.apply()
    assert first == second and len(first) >= 1


def test_placeholder_not_installed_when_real_extension_exists(monkeypatch):
    """On a full detectron2 (with _C) the shim must not shadow it."""
    monkeypatch.delitem(sys.modules, "detectron2._C")
    real_find_spec = importlib.util.find_spec

    def find_spec(name, *a, **k):
        if name == "detectron2._C":
            return importlib.machinery.ModuleSpec(name, loader=None, origin="built/_C.so")
        return real_find_spec(name, *a, **k)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    compat._install_c_extension_placeholder()
    assert "detectron2._C" not in sys.modules


def _run_installer(tmp_path, *args):
    return subprocess.run([sys.executable, os.path.join(REPO, "tools", "install_detectron2.py"),
                           *args], capture_output=True, text=True, cwd=tmp_path)


def test_installer_pins_the_expected_hash():
    with open(os.path.join(REPO, "requirements", "detectron2.txt")) as f:
        text = f.read()
    assert f"pb1-detectron2==0.6 --hash=sha256:{PINNED}" in text


def test_installer_refuses_a_file_with_another_hash(tmp_path):
    sys.path.insert(0, os.path.join(REPO, "tools"))
    try:
        installer = importlib.import_module("install_detectron2")
    finally:
        sys.path.pop(0)
    fake = tmp_path / "pb1-detectron2-0.6.tar.gz"
    src = tmp_path / "pkg"
    src.mkdir()
    (src / "setup.py").write_text("from setuptools import setup\nsetup()\n")
    with tarfile.open(fake, "w:gz") as tar:
        tar.add(src, arcname="pb1-detectron2-0.6")
    with pytest.raises(SystemExit, match="refusing to install"):
        installer.install_from_sdist(str(fake), PINNED)
    # With its own hash pinned, the same file gets past the hash check to the setup.py patch.
    own = hashlib.sha256(fake.read_bytes()).hexdigest()
    with pytest.raises(SystemExit, match="does not look like detectron2 v0.6") as info:
        installer.install_from_sdist(str(fake), own)
    assert "refusing to install" not in str(info.value)


def test_installer_keeps_an_importable_detectron2(tmp_path):
    out = _run_installer(tmp_path)
    assert out.returncode == 0, out.stderr
    assert "keeping it" in out.stdout


def test_import_d2_norms_has_version():
    assert d2_norms.__version__


def test_collect_env_reports_the_missing_extension_instead_of_raising():
    from detectron2.utils.collect_env import collect_env_info

    from detectron2 import _C

    text = collect_env_info()
    if getattr(_C, "d2_norms_placeholder", False):
        assert "not built" in text
