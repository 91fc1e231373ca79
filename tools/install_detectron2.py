#!/usr/bin/env python
"""Install Detectron2 v0.6 (pure Python, no C++ extension) into the running interpreter.

Run by ``make setup``. Keeps any detectron2 that already imports (for example one built from
source with its compiled ops). Otherwise downloads the hash-pinned ``pb1-detectron2==0.6`` sdist
(``requirements/detectron2.txt``), refuses any other file, drops the C++ extension from its
``setup.py`` (the sdist has no ``detectron2/layers/csrc`` to compile) and installs it as a normal
distribution, so ``pip show pb1-detectron2`` lists it and ``pip uninstall`` removes it.
Runtime requirements come from d2_norms' own ``setup.py`` (detectron2's pins that do not apply
here, such as ``black``, are skipped).
"""
import argparse
import hashlib
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REQUIREMENT_FILE = os.path.join(REPO, "requirements", "detectron2.txt")
EXT_LINE = "ext_modules=get_extensions(),"


def pinned_sha256(requirement_file: str) -> str:
    with open(requirement_file) as f:
        match = re.search(r"--hash=sha256:([0-9a-f]{64})", f.read())
    if not match:
        sys.exit(f"error: no sha256 pin found in {requirement_file}")
    return match.group(1)


def sha256_of(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def pip(*args: str) -> None:
    cmd = [sys.executable, "-m", "pip", *args]
    print("+", " ".join(cmd), flush=True)
    subprocess.check_call(cmd)


def download_sdist(cache_dir: str, expected: str) -> str:
    os.makedirs(cache_dir, exist_ok=True)
    for name in os.listdir(cache_dir):
        path = os.path.join(cache_dir, name)
        if name.endswith(".tar.gz") and sha256_of(path) == expected:
            return path
    # --no-build-isolation: the sdist's setup.py imports torch just to produce its metadata;
    # an isolated build environment would download a second torch.
    pip("download", "--no-deps", "--no-build-isolation", "--require-hashes",
        "-r", REQUIREMENT_FILE, "-d", cache_dir)
    for name in os.listdir(cache_dir):
        path = os.path.join(cache_dir, name)
        if name.endswith(".tar.gz") and sha256_of(path) == expected:
            return path
    sys.exit(f"error: no file in {cache_dir} has the pinned sha256 {expected}; refusing to install")


def install_from_sdist(sdist: str, expected: str) -> None:
    actual = sha256_of(sdist)
    if actual != expected:
        sys.exit(f"error: {sdist} has sha256 {actual}, expected {expected}; refusing to install")
    with tempfile.TemporaryDirectory(prefix="d2_sdist_") as tmp:
        with tarfile.open(sdist) as tar:
            tar.extractall(tmp, filter="data")
        (root,) = [os.path.join(tmp, d) for d in os.listdir(tmp)]
        setup_py = os.path.join(root, "setup.py")
        with open(setup_py) as f:
            source = f.read()
        if source.count(EXT_LINE) != 1:
            sys.exit(f"error: {setup_py} does not look like detectron2 v0.6's setup.py "
                     f"(expected one '{EXT_LINE}'); refusing to patch it")
        with open(setup_py, "w") as f:
            f.write(source.replace(EXT_LINE, "ext_modules=[],  # d2_norms: no csrc in this sdist"))
        # Build a wheel without the extension and install it as a regular distribution.
        pip("install", "--no-deps", "--no-build-isolation", root)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache-dir", default=os.path.join(REPO, ".cache", "sdist"))
    parser.add_argument("--force", action="store_true",
                        help="reinstall from the pinned sdist even if detectron2 imports")
    args = parser.parse_args()
    if importlib.util.find_spec("torch") is None:
        sys.exit("error: install torch==2.14.1 first (make setup does this)")
    if not args.force and importlib.util.find_spec("detectron2") is not None:
        origin = importlib.util.find_spec("detectron2").origin
        has_ops = importlib.util.find_spec("detectron2._C") is not None
        print(f"detectron2 already installed ({os.path.dirname(origin)}; compiled ops: "
              f"{'yes' if has_ops else 'no'}): keeping it")
        return
    expected = pinned_sha256(REQUIREMENT_FILE)
    install_from_sdist(download_sdist(args.cache_dir, expected), expected)


if __name__ == "__main__":
    main()
