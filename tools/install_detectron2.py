#!/usr/bin/env python
"""Install Detectron2 into the running interpreter: v0.6 (pure Python) or a source tree / tarball.

Without ``--source`` (``make setup``): keeps any detectron2 that already imports (for example one
built from source with its compiled ops). Otherwise downloads the hash-pinned
``pb1-detectron2==0.6`` sdist (``requirements/detectron2.txt``), refuses any other file, drops the
C++ extension from its ``setup.py`` (the sdist has no ``detectron2/layers/csrc`` to compile) and
installs it as a normal distribution, so ``pip show pb1-detectron2`` lists it and ``pip uninstall``
removes it. Runtime requirements come from d2_norms' own ``setup.py`` (detectron2's pins that do
not apply here, such as ``black``, are skipped).

With ``--source PATH`` (a detectron2 source tree, e.g. a checkout of main, or a ``.tar.gz`` of
one; ``make test-d2main``): installs it as a user would, replacing any installed detectron2:
its runtime requirements from its ``setup.py`` ``install_requires`` (torch and torchvision pinned
to the installed builds on every pip call, so pip never pulls another torch), then
``pip install --no-deps --no-build-isolation``. ``--ops`` picks the C++ extension
(``detectron2._C``: rotated boxes, deformable conv, fast COCO eval):
  auto (default)  build it when a C++ compiler is found, fall back to pure Python if that fails;
  yes             build it or fail (exit 1);
  no              pure Python (``ext_modules=[]``, as the snapshot's README describes).
Which CUDA/CPU variant is built is detectron2's own ``setup.py`` decision: CUDA ops only when
``torch.cuda.is_available()`` and CUDA_HOME is found, or ``FORCE_CUDA=1``; otherwise CPU ops.
A compiled build is cached as a wheel under ``--wheel-cache`` (default
``$D2_NORMS_CACHE/detectron2-wheels``, ``$D2_NORMS_CACHE`` defaulting to ``~/.cache/d2_norms``),
keyed by the source's sha256, the CPU/CUDA variant and the torch and Python versions; an empty
cache builds.
The last line printed says what was installed. Exit code 2: bad input (not a detectron2 tree,
a corrupted tarball, a detectron2 older than d2_norms supports).
"""
import argparse
import ast
import hashlib
import importlib.metadata
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import zlib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REQUIREMENT_FILE = os.path.join(REPO, "requirements", "detectron2.txt")
EXT_LINE = "ext_modules=get_extensions(),"
# The oldest detectron2 d2_norms runs on (v0.6; main reports 0.6 as well).
MIN_DETECTRON2_VERSION = (0, 6)
# install_requires entries of detectron2's setup.py that are no runtime requirement of the
# library: black formats code (and pins click versions that clash with other tools).
NOT_RUNTIME_REQUIREMENTS = {"black"}
# Distributions that ship the `detectron2` package; installing one replaces the others.
DETECTRON2_DISTRIBUTIONS = ("detectron2", "pb1-detectron2")
# Directories of a source tree that are build outputs, not source.
COPY_IGNORE = shutil.ignore_patterns(".git", "build", "dist", "*.egg-info", "__pycache__", "*.so",
                                     "*.pyc")


class BadInput(Exception):
    """The --source given is not something this tool can install (exit code 2)."""


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


# ---------------------------------------------------------------------------------------------
# --source: a detectron2 source tree or tarball


def torch_pins() -> list:
    """`name==version` for the installed torch and torchvision: given to every pip call that
    resolves requirements, so none of them can replace the installed (multi-GB) torch build."""
    pins = []
    for name in ("torch", "torchvision"):
        try:
            pins.append(f"{name}=={importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            if name == "torch":
                raise
    return pins


def tree_sha256(root: str) -> str:
    """Content hash of a source tree: relative paths and bytes of every file, in sorted order."""
    digest = hashlib.sha256()
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(filenames):
            path = os.path.join(dirpath, name)
            if os.path.islink(path):
                continue
            digest.update(os.path.relpath(path, root).encode() + b"\0")
            digest.update(sha256_of(path).encode())
    return digest.hexdigest()


def find_detectron2_root(path: str) -> str:
    """The directory holding setup.py and detectron2/ at `path` or one level below it."""
    candidates = [path] + sorted(os.path.join(path, d) for d in os.listdir(path)
                                 if os.path.isdir(os.path.join(path, d)))
    for candidate in candidates:
        if (os.path.isfile(os.path.join(candidate, "setup.py"))
                and os.path.isfile(os.path.join(candidate, "detectron2", "__init__.py"))):
            return candidate
    raise BadInput("is not a detectron2 source tree: no setup.py next to a detectron2/__init__.py "
                   "(at its top or one directory below). Pass a checkout of detectron2 (main) or "
                   "a .tar.gz of one")


def detectron2_version(root: str) -> str:
    with open(os.path.join(root, "detectron2", "__init__.py")) as f:
        match = re.search(r"""^__version__\s*=\s*["']([^"']+)["']""", f.read(), re.MULTILINE)
    if not match:
        raise BadInput("has a detectron2/__init__.py without a __version__ line: not a detectron2 "
                       "source tree this tool knows")
    return match.group(1)


def check_version(version: str) -> None:
    numbers = tuple(int(n) for n in re.findall(r"\d+", version)[:2])
    if numbers < MIN_DETECTRON2_VERSION:
        need = ".".join(map(str, MIN_DETECTRON2_VERSION))
        raise BadInput(f"holds detectron2 {version}, which is too old for d2_norms (it needs "
                       f"detectron2 >= {need}: v0.6 or main). Use a checkout of detectron2 main, "
                       "or run this tool without --source for v0.6")


def runtime_requirements(setup_py: str) -> list:
    """install_requires of detectron2's setup.py (read, not executed), less the entries that do
    not apply: environment markers that are false here and NOT_RUNTIME_REQUIREMENTS."""
    from packaging.requirements import InvalidRequirement, Requirement

    with open(setup_py) as f:
        tree = ast.parse(f.read(), setup_py)
    for node in ast.walk(tree):
        if isinstance(node, ast.keyword) and node.arg == "install_requires":
            try:
                entries = ast.literal_eval(node.value)
            except ValueError as e:
                raise BadInput(f"{setup_py}: install_requires is not a literal list ({e})") from e
            break
    else:
        raise BadInput(f"{setup_py} has no install_requires: not detectron2's setup.py")
    keep = []
    for entry in entries:
        try:
            requirement = Requirement(entry)
        except InvalidRequirement as e:
            raise BadInput(f"{setup_py}: install_requires entry {entry!r} is invalid ({e})") from e
        if requirement.marker is not None and not requirement.marker.evaluate():
            print(f"  skipping requirement {entry!r}: does not apply to this Python")
            continue
        if requirement.name.lower() in NOT_RUNTIME_REQUIREMENTS:
            print(f"  skipping requirement {entry!r}: not needed at run time")
            continue
        keep.append(entry)
    return keep


def unpack_source(source: str, workdir: str) -> tuple:
    """Copy or extract `source` into `workdir`; return (root of the tree in workdir, sha256)."""
    if os.path.isdir(source):
        copy = os.path.join(workdir, "src")
        shutil.copytree(source, copy, ignore=COPY_IGNORE, symlinks=True)
        root = find_detectron2_root(copy)
        return root, tree_sha256(root)
    if not os.path.isfile(source):
        raise BadInput("does not exist")
    digest = sha256_of(source)
    extract = os.path.join(workdir, "src")
    os.makedirs(extract)
    try:
        with tarfile.open(source) as tar:
            tar.extractall(extract, filter="data")
    except (tarfile.TarError, EOFError, zlib.error, OSError) as e:
        reason = (str(e).splitlines() or [""])[0].rstrip(":")
        raise BadInput(f"cannot be read as a .tar.gz ({type(e).__name__}: {reason}): the file is "
                       f"corrupted or truncated, or not a tarball (sha256 {digest}); fetch it "
                       "again, or pass the source directory") from e
    return find_detectron2_root(extract), digest


def cuda_ops_would_build() -> bool:
    """detectron2's setup.py decision (get_extensions): CUDA ops with a usable GPU and a CUDA
    toolkit, or when FORCE_CUDA=1; CPU ops otherwise."""
    import torch
    from torch.utils.cpp_extension import CUDA_HOME

    return bool((torch.cuda.is_available() and CUDA_HOME is not None)
                or os.environ.get("FORCE_CUDA", "0") == "1")


def cxx_compiler() -> str:
    """The C++ compiler torch's extension builder will call (CXX, else c++), or '' if none."""
    return shutil.which(os.environ.get("CXX", "c++")) or ""


def wheel_cache_dir(explicit: str) -> str:
    """Outside the work tree by default (like d2_norms' datasets), so a fresh clone, such as a
    CI run's, reuses the build."""
    if explicit:
        return explicit
    root = os.environ.get("D2_NORMS_CACHE") or os.path.join(os.path.expanduser("~"), ".cache",
                                                            "d2_norms")
    return os.path.join(root, "detectron2-wheels")


def cache_key(source_sha256: str, variant: str) -> str:
    import torch

    python = f"cp{sys.version_info[0]}{sys.version_info[1]}"
    return f"{source_sha256[:16]}-{variant}-torch{torch.__version__}-{python}".replace("+", "_")


def build_wheel(root: str, out_dir: str, log_path: str) -> str:
    """pip wheel with the C++ extension; returns the wheel's path. Output goes to log_path."""
    cmd = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
           "-w", out_dir, root]
    print("+", " ".join(cmd), f"> {log_path}", flush=True)
    with open(log_path, "w") as log:
        subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, check=True)
    (wheel,) = [os.path.join(out_dir, n) for n in os.listdir(out_dir) if n.endswith(".whl")]
    return wheel


def uninstall_installed_detectron2() -> None:
    """Remove detectron2 distributions of this environment (under sys.prefix), so that two
    distributions never ship the same files. One visible from elsewhere on sys.path is left
    alone: the new install goes to this environment's site-packages, which comes first."""
    prefix = os.path.realpath(sys.prefix) + os.sep
    installed = []
    for name in DETECTRON2_DISTRIBUTIONS:
        try:
            location = os.path.realpath(str(importlib.metadata.distribution(name).locate_file("")))
        except importlib.metadata.PackageNotFoundError:
            continue
        if location.startswith(prefix):
            installed.append(name)
        else:
            print(f"  leaving {name} at {location} alone: outside this environment ({sys.prefix})")
    if installed:
        pip("uninstall", "--yes", *installed)


VERIFY_COMPILED = """
import torch, detectron2
from detectron2 import _C  # loads the extension, which registers torch.ops.detectron2.*
from detectron2.layers.rotated_boxes import pairwise_iou_rotated
box = torch.tensor([[5.0, 5.0, 4.0, 2.0, 30.0]])
iou = float(pairwise_iou_rotated(box, box)[0, 0])
assert abs(iou - 1.0) < 1e-5, iou
print(_C.__file__)
"""


def verify_compiled_ops() -> str:
    """Import the installed extension in a fresh interpreter and compute a rotated IoU with it;
    return '' when it works, else what went wrong."""
    out = subprocess.run([sys.executable, "-c", VERIFY_COMPILED], capture_output=True, text=True,
                         cwd=tempfile.gettempdir())
    if out.returncode == 0:
        return ""
    return (out.stderr or out.stdout).strip().splitlines()[-1]


def install_pure_python(root: str) -> None:
    setup_py = os.path.join(root, "setup.py")
    with open(setup_py) as f:
        text = f.read()
    if text.count(EXT_LINE) != 1:
        raise BadInput(f"has a setup.py without exactly one '{EXT_LINE}' line: cannot drop the "
                       "C++ extension from it (install it with --ops yes, or check the tree)")
    with open(setup_py, "w") as f:
        f.write(text.replace(EXT_LINE, "ext_modules=[],  # d2_norms: pure Python, no C++ ops"))
    pip("install", "--no-deps", "--no-build-isolation", "--force-reinstall", root)


def try_compiled(root: str, source_sha256: str, args, variant: str) -> tuple:
    """Install detectron2 with its compiled ops from the wheel cache or a fresh build. Returns
    (why it did not work or '', where the build came from); the caller decides between failing
    and falling back."""
    cache = wheel_cache_dir(args.wheel_cache)
    key = cache_key(source_sha256, variant)
    cached = os.path.join(cache, key)
    wheels = sorted(n for n in os.listdir(cached) if n.endswith(".whl")) \
        if os.path.isdir(cached) else []
    if wheels:
        wheel = os.path.join(cached, wheels[0])
        print(f"using the cached build {wheel}", flush=True)
        how = f"from the wheel cache ({wheel})"
    else:
        print(f"building detectron2's C++ ops ({variant.upper()} only) with {cxx_compiler()}; "
              "this takes minutes", flush=True)
        out_dir = tempfile.mkdtemp(prefix="d2_wheel_", dir=os.path.dirname(root))
        log_path = os.path.join(os.path.dirname(root), "build.log")
        start = time.monotonic()
        try:
            wheel = build_wheel(root, out_dir, log_path)
        except subprocess.CalledProcessError:
            seconds = time.monotonic() - start
            kept_log = os.path.join(tempfile.gettempdir(), f"d2_norms_detectron2_build_{key}.log")
            shutil.copyfile(log_path, kept_log)
            with open(log_path, errors="replace") as f:
                lines = f.readlines()
            # The compiler's error lines sit far above pip's closing lines.
            errors = [line for line in lines if "error" in line.lower()][:15]
            print(f"--- build errors ---\n{''.join(errors)}--- last lines ---\n"
                  f"{''.join(lines[-8:])}--- full log: {kept_log} ---", flush=True)
            return f"the C++ build failed after {seconds:.0f} s (log: {kept_log})", ""
        seconds = time.monotonic() - start
        print(f"C++ ops built in {seconds:.0f} s", flush=True)
        how = f"built in {seconds:.0f} s"
        try:  # best effort: a read-only cache only costs the next run a rebuild
            staging = tempfile.mkdtemp(prefix=f".{key}.tmp-", dir=_makedirs(cache))
            shutil.copy2(wheel, staging)
            os.replace(staging, cached)
            print(f"cached the build in {cached}", flush=True)
        except OSError as e:
            print(f"note: could not cache the build in {cache} ({e})", flush=True)
    pip("install", "--no-deps", "--force-reinstall", wheel)
    problem = verify_compiled_ops()
    if problem:
        return f"the compiled extension does not work ({problem})", how
    return "", how


def _makedirs(path: str) -> str:
    os.makedirs(path, exist_ok=True)
    return path


def install_from_source(args) -> str:
    """Install the detectron2 at args.source; return the one-line summary of what it did."""
    source = os.path.abspath(args.source)
    workdir = tempfile.mkdtemp(prefix="d2_source_")
    try:
        try:
            root, digest = unpack_source(source, workdir)
            version = detectron2_version(root)
            check_version(version)
            requirements = runtime_requirements(os.path.join(root, "setup.py"))
        except BadInput as e:
            raise BadInput(f"--source {args.source} {e}") from None
        print(f"detectron2 {version} source at {source} (sha256 {digest[:16]}...)", flush=True)
        pins = torch_pins()
        # Pinned: fvcore, timm etc. must not resolve to another torch.
        pip("install", "--quiet", *requirements, *pins)
        uninstall_installed_detectron2()

        variant = "cuda" if cuda_ops_would_build() else "cpu"
        reason, how = "", ""
        if args.ops == "no":
            reason = "--ops no"
        elif not cxx_compiler():
            reason = f"no C++ compiler found ({os.environ.get('CXX', 'c++')} is not on PATH)"
        else:
            reason, how = try_compiled(root, digest, args, variant)
        if not reason:
            return (f"detectron2 {version} installed from {source} WITH its compiled C++ ops "
                    f"({variant.upper()} ops; {how})")
        if args.ops == "yes":
            raise RuntimeError(f"--ops yes: {reason}")
        if args.ops == "auto":
            print(f"note: {reason}; installing detectron2 as pure Python instead", flush=True)
        install_pure_python(root)
        return (f"detectron2 {version} installed from {source} as PURE PYTHON, without its C++ "
                f"ops ({reason}); d2_norms' placeholder answers calls to them with a clear error")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        epilog="Exit codes: 0 installed, 1 build/install failure, 2 bad input.")
    parser.add_argument("--cache-dir", default=os.path.join(REPO, ".cache", "sdist"),
                        help="where the v0.6 sdist is downloaded to")
    parser.add_argument("--force", action="store_true",
                        help="reinstall from the pinned sdist even if detectron2 imports")
    parser.add_argument("--source", metavar="PATH",
                        help="a detectron2 source tree or .tar.gz of one to install instead of v0.6")
    parser.add_argument("--ops", choices=("auto", "yes", "no"), default="auto",
                        help="with --source: build the C++ ops (auto: try, else pure Python)")
    parser.add_argument("--wheel-cache", default="", metavar="DIR",
                        help="with --source: cache of compiled builds (default "
                             "$D2_NORMS_CACHE/detectron2-wheels, ~/.cache/d2_norms/...)")
    args = parser.parse_args()
    if importlib.util.find_spec("torch") is None:
        sys.exit("error: install torch==2.14.1 first (make setup does this)")
    if args.source:
        try:
            summary = install_from_source(args)
        except BadInput as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)
        except (RuntimeError, subprocess.CalledProcessError) as e:
            sys.exit(f"error: {e}")
        print(summary, flush=True)
        return
    if args.ops != "auto" or args.wheel_cache:
        parser.error("--ops and --wheel-cache apply only with --source")
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
