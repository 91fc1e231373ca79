"""The install result: a real detectron2 distribution, the compatibility shims, the installer's
hash pin."""
import hashlib
import importlib
import importlib.metadata
import os
import shutil
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


def _has_compiled_ops():
    return importlib.util.find_spec("detectron2._C") is not None


def test_c_extension_placeholder_behaves_like_a_module():
    placeholder = compat._MissingExtension("detectron2._C")
    # Ops of the extension exist (so v0.6's `from detectron2 import _C` modules import) ...
    assert hasattr(placeholder, "deform_conv_forward")
    # ... unknown names raise AttributeError, so hasattr/getattr(default) work.
    assert not hasattr(placeholder, "no_such_op")
    assert getattr(placeholder, "no_such_op", 42) == 42
    with pytest.raises(AttributeError):
        placeholder.__wrapped__
    for name, feature in [("deform_conv_forward", "deformable"),
                          ("box_iou_rotated", "rotated box IoU"),
                          ("COCOevalAccumulate", "fast COCO evaluation")]:
        with pytest.raises(compat.MissingCompiledOpError, match=feature) as info:
            getattr(placeholder, name)(1, 2)
        assert name in str(info.value)


def test_no_stand_in_for_the_compiled_extension_is_left_behind():
    """detectron2's own ``try: from detectron2 import _C / except ImportError`` fallbacks see
    what they see without d2_norms."""
    import detectron2
    import detectron2.layers.deform_conv  # noqa: F401
    import detectron2.layers.rotated_boxes as rb
    import torch

    if _has_compiled_ops():
        pytest.skip("detectron2 is built with its C++ ops here")
    assert "detectron2._C" not in sys.modules and not hasattr(detectron2, "_C")
    with pytest.raises(ImportError):
        from detectron2 import _C  # noqa: F401
    with pytest.raises(ImportError):
        import detectron2.evaluation.fast_eval_api  # noqa: F401
    from detectron2.evaluation import coco_evaluation
    from pycocotools.cocoeval import COCOeval

    assert coco_evaluation.COCOeval_opt is COCOeval  # main's fallback (v0.6: given by the shim)
    # a missing op fails when called: v0.6's layers hold the placeholder (a clear message);
    # main's call torch.ops.detectron2 (torch's own error, as without d2_norms)
    with pytest.raises((compat.MissingCompiledOpError, RuntimeError, AttributeError)) as info:
        rb.pairwise_iou_rotated(torch.zeros(1, 5), torch.zeros(1, 5))
    assert "box_iou_rotated" in str(info.value)


def test_pillow_linear_alias_only_during_the_import():
    from PIL import Image

    from detectron2.data.transforms import ExtentTransform

    transform = ExtentTransform((0, 0, 4, 4), (4, 4))  # default interp=Image.LINEAR resolved
    assert transform.interp == Image.BILINEAR
    if any("PIL.Image.LINEAR" in entry for entry in compat.applied()):
        assert not hasattr(Image, "LINEAR")  # Pillow itself is left as it is


def test_model_zoo_imports_and_its_pkg_resources_resolves_files():
    import detectron2.model_zoo.model_zoo as zoo

    path = zoo.pkg_resources.resource_filename("detectron2", "__init__.py")
    assert os.path.isfile(path)
    if any("pkg_resources stand-in" in entry for entry in compat.applied()):
        assert "pkg_resources" not in sys.modules
        with pytest.raises(ImportError):
            import pkg_resources  # noqa: F401


def test_numpy_aliases_only_where_detectron2_uses_them():
    import torch
    from detectron2.structures import BitMasks, PolygonMasks

    added = {e.split(" = ")[0][len("numpy."):] for e in compat.applied() if e.startswith("numpy.")}
    assert added <= set(compat._numpy_aliases_detectron2_uses())
    for name in added:
        assert getattr(np, name) is compat._NUMPY_ALIASES[name]
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
    assert first == second


def test_placeholder_not_installed_when_real_extension_exists(monkeypatch):
    """On a full detectron2 (with _C) the shim must not shadow it."""
    real_find_spec = importlib.util.find_spec

    def find_spec(name, *a, **k):
        if name == "detectron2._C":
            return importlib.machinery.ModuleSpec(name, loader=None, origin="built/_C.so")
        return real_find_spec(name, *a, **k)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    before, module_before = compat.applied(), sys.modules.get("detectron2._C")
    compat._import_layers_without_compiled_ops()
    assert sys.modules.get("detectron2._C") is module_before and compat.applied() == before
    assert not isinstance(module_before, compat._MissingExtension)


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

    text = collect_env_info()  # detectron2's own ImportError branch for a missing _C
    if not _has_compiled_ops():
        assert "not built" in text


# ---------------------------------------------------------------------------------------------
# detectron2's compiled ops, where they are built: used, and nothing of d2_norms in the way.


def test_compiled_ops_are_used_and_placeholder_stays_out():
    if not _has_compiled_ops():
        pytest.skip("this detectron2 was installed without its compiled C++ ops (pure Python); "
                    "install one with `tools/install_detectron2.py --source <tree> --ops yes`")
    import torch
    import torchvision
    from detectron2 import _C
    from detectron2.layers import nms_rotated
    from detectron2.structures import RotatedBoxes, pairwise_iou_rotated

    assert _C.__file__ and _C.__file__.endswith(".so")
    assert not any("placeholder" in entry for entry in compat.applied())
    from detectron2.evaluation import coco_evaluation
    from detectron2.evaluation.fast_eval_api import COCOeval_opt

    assert coco_evaluation.COCOeval_opt is COCOeval_opt  # the compiled fast evaluation
    box = torch.tensor([[5.0, 5.0, 4.0, 2.0, 30.0]])
    assert pairwise_iou_rotated(RotatedBoxes(box), RotatedBoxes(box)).item() == pytest.approx(1.0)
    # Reference: at angle 0 rotated IoU / NMS are torchvision's axis-aligned ones.
    gen = torch.Generator().manual_seed(0)
    centers, sizes = torch.rand(12, 2, generator=gen) * 20, torch.rand(12, 2, generator=gen) * 8 + 1
    rotated = torch.cat([centers, sizes, torch.zeros(12, 1)], dim=1)
    xyxy = torch.cat([centers - sizes / 2, centers + sizes / 2], dim=1)
    torch.testing.assert_close(pairwise_iou_rotated(RotatedBoxes(rotated), RotatedBoxes(rotated)),
                               torchvision.ops.box_iou(xyxy, xyxy), atol=1e-5, rtol=1e-5)
    scores = torch.rand(12, generator=gen)
    assert torch.equal(nms_rotated(rotated, scores, 0.3), torchvision.ops.nms(xyxy, scores, 0.3))


# ---------------------------------------------------------------------------------------------
# tools/install_detectron2.py --source and `make test-d2main`

SNAPSHOT = os.path.join(os.path.dirname(REPO), "shared", "third_party",
                        "detectron2-02b5c4e2.tar.gz")
needs_snapshot = pytest.mark.skipif(
    not os.path.isfile(SNAPSHOT),
    reason="the detectron2 main snapshot (../shared/third_party/detectron2-02b5c4e2.tar.gz, test "
           "material next to the repository) is absent, as on a user's machine")


def _fake_detectron2_tree(root, version="0.6"):
    (root / "detectron2").mkdir(parents=True)
    (root / "detectron2" / "__init__.py").write_text(f'__version__ = "{version}"\n')
    (root / "setup.py").write_text(
        "from setuptools import setup\n"
        "setup(name='detectron2', install_requires=['tabulate'],\n"
        "      ext_modules=get_extensions(),\n)\n")
    return root


@pytest.mark.parametrize("case", ["missing", "not_detectron2", "corrupted_tarball",
                                  "not_a_tarball", "too_old"])
def test_installer_source_bad_input_exits_2_with_a_clear_message(tmp_path, case):
    if case == "missing":
        source, expected = tmp_path / "nowhere.tar.gz", "does not exist"
    elif case == "not_detectron2":
        source = tmp_path / "some_project"
        (source / "pkg").mkdir(parents=True)
        (source / "setup.py").write_text("from setuptools import setup\nsetup()\n")
        expected = "is not a detectron2 source tree"
    elif case in ("corrupted_tarball", "not_a_tarball"):
        tree = _fake_detectron2_tree(tmp_path / "tree")
        good = tmp_path / "good.tar.gz"
        with tarfile.open(good, "w:gz") as tar:
            tar.add(tree, arcname="detectron2-src")
        data = good.read_bytes()
        source = tmp_path / "broken.tar.gz"
        # truncated download vs. an HTML error page saved under the tarball's name
        source.write_bytes(data[: len(data) // 2] if case == "corrupted_tarball"
                           else b"<html>404 not found</html>\n")
        expected = "cannot be read as a .tar.gz"
    else:
        source, expected = _fake_detectron2_tree(tmp_path / "old", version="0.5"), "too old"
    out = _run_installer(tmp_path, "--source", str(source), "--ops", "no")
    assert out.returncode == 2, out.stdout + out.stderr
    assert expected in out.stderr and str(source) in out.stderr
    assert "Traceback" not in out.stderr
    assert "+ " not in out.stdout  # refused before any pip call


@needs_snapshot
def test_runtime_requirements_of_detectron2_main_skip_what_does_not_apply(tmp_path):
    sys.path.insert(0, os.path.join(REPO, "tools"))
    try:
        installer = importlib.import_module("install_detectron2")
    finally:
        sys.path.pop(0)
    with tarfile.open(SNAPSHOT) as tar:
        (tmp_path / "setup.py").write_bytes(tar.extractfile("setup.py").read())
    requirements = installer.runtime_requirements(str(tmp_path / "setup.py"))
    names = [r.split(";")[0].split(">")[0].split("<")[0].split("=")[0] for r in requirements]
    assert "black" not in names and "dataclasses" not in names
    assert {"fvcore", "iopath", "omegaconf", "hydra-core", "pycocotools"} <= set(names)
    assert not any(n.startswith("torch") for n in names)


def _overlay_venv(tmp_path):
    """A fresh venv (no pip, no torch of its own) that sees this venv's packages through a .pth
    after its own site-packages: what the installer puts there shadows this venv's detectron2,
    which stays untouched. Returns (python, its site-packages)."""
    import sysconfig

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = str(venv / "bin" / "python")
    site = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                          capture_output=True, text=True, check=True).stdout.strip()
    with open(os.path.join(site, "outer_venv.pth"), "w") as f:
        f.write(sysconfig.get_path("purelib") + "\n")
    return python, site


def _run_installer_in(python, tmp_path, *args):
    return subprocess.run([python, os.path.join(REPO, "tools", "install_detectron2.py"), *args],
                          capture_output=True, text=True, cwd=tmp_path,
                          env=dict(os.environ, PYTHONPATH=REPO), timeout=900)


@pytest.mark.slow
def test_installer_falls_back_to_pure_python_when_the_cpp_build_fails(tmp_path):
    if not shutil.which(os.environ.get("CXX", "c++")):
        pytest.skip("no C++ compiler: the installer does not try a build")
    tree = _fake_detectron2_tree(tmp_path / "tree")
    (tree / "setup.py").write_text(
        "from setuptools import setup\n"
        "from torch.utils.cpp_extension import BuildExtension, CppExtension\n"
        "def get_extensions():\n"
        "    return [CppExtension('detectron2._C', ['detectron2/broken.cpp'])]\n"
        "setup(name='detectron2', version='0.6', packages=['detectron2'],\n"
        "      install_requires=['tabulate'],\n"
        "      ext_modules=get_extensions(),\n"
        "      cmdclass={'build_ext': BuildExtension})\n")
    (tree / "detectron2" / "broken.cpp").write_text("#error this extension does not compile\n")
    python, site = _overlay_venv(tmp_path)
    cache = tmp_path / "wheels"
    out = _run_installer_in(python, tmp_path, "--source", str(tree), "--ops", "yes",
                            "--wheel-cache", str(cache))
    assert out.returncode == 1, out.stdout[-3000:] + out.stderr[-3000:]
    assert "--ops yes: the C++ build failed" in out.stderr
    assert "this extension does not compile" in out.stdout  # the build log's tail is shown
    out = _run_installer_in(python, tmp_path, "--source", str(tree), "--wheel-cache", str(cache))
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "note: the C++ build failed" in out.stdout
    last = out.stdout.strip().splitlines()[-1]
    assert "PURE PYTHON" in last and "the C++ build failed" in last
    assert os.path.isfile(os.path.join(site, "detectron2", "__init__.py"))
    assert not cache.exists() or not os.listdir(cache)  # nothing cached from a failure


@pytest.mark.slow
@needs_snapshot
def test_install_detectron2_main_from_a_source_tree_pure_python(tmp_path):
    """Install the snapshot (extracted: a source tree) into an overlay venv; the new detectron2
    lands in the new venv, and its rotated ops fail as detectron2 main fails without them."""
    tree = tmp_path / "detectron2-main"
    tree.mkdir()
    with tarfile.open(SNAPSHOT) as tar:
        tar.extractall(tree, filter="data")
    python, site = _overlay_venv(tmp_path)
    env = dict(os.environ, PYTHONPATH=REPO)
    out = _run_installer_in(python, tmp_path, "--source", str(tree), "--ops", "no")
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    last = out.stdout.strip().splitlines()[-1]
    assert "installed from" in last and "PURE PYTHON" in last
    assert "pb1-detectron2" in out.stdout and "alone" in out.stdout  # this venv's v0.6 untouched
    check = (
        "import d2_norms, detectron2, torch\n"
        "from detectron2.layers import nms_rotated\n"
        "print(detectron2.__file__)\n"
        "from importlib.metadata import version; print(version('detectron2'))\n"
        "try:\n"
        "    nms_rotated(torch.zeros(1, 5), torch.ones(1), 0.5)\n"
        "except Exception as e:\n"
        "    print('missing op:', type(e).__name__, str(e).splitlines()[0])\n"
    )
    out = subprocess.run([python, "-c", check], capture_output=True, text=True, cwd=tmp_path,
                         env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    location, version, message = out.stdout.strip().splitlines()[-3:]
    assert location.startswith(site), location
    assert version == "0.6"
    assert message.startswith("missing op:") and "nms_rotated" in message, message
    # The outer venv still has its own detectron2.
    assert importlib.metadata.version("pb1-detectron2") == "0.6"


def test_make_test_d2main_without_the_snapshot_says_so_and_succeeds(tmp_path):
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    venv = tmp_path / "venv-d2main"
    out = subprocess.run(["make", "--no-print-directory", "test-d2main",
                          f"D2MAIN_SOURCE={tmp_path / 'absent' / 'detectron2.tar.gz'}",
                          f"D2MAIN_VENV={venv}"], capture_output=True, text=True, cwd=REPO,
                         timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "test-d2main: skipped" in out.stdout and "not found" in out.stdout
    assert not venv.exists()


def test_detectron2_api_check_names_version_and_what_is_missing():
    """A detectron2 lacking an API d2_norms builds on is reported at import with its version and
    the missing names (here: the check run against a list with two names no detectron2 has)."""
    import detectron2

    from d2_norms import compat

    compat.check_detectron2()  # the installed one (v0.6 or main) has everything
    required = compat.REQUIRED_DETECTRON2_API + (
        ("detectron2.modeling", "NO_SUCH_REGISTRY", "a future feature"),
        ("detectron2.no_such_module", "anything", "another feature"),
    )
    with pytest.raises(compat.UnsupportedDetectron2Error) as info:
        compat.check_detectron2(required)
    message = str(info.value)
    assert f"detectron2 {detectron2.__version__}" in message
    assert "detectron2.modeling.NO_SUCH_REGISTRY (used for a future feature)" in message
    assert "detectron2.no_such_module (cannot import" in message
    assert "BACKBONE_REGISTRY" not in message  # only what is missing is listed
