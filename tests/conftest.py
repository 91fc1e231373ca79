"""Shared test set-up.

``import d2_norms`` comes first: it applies the detectron2 v0.6 shims (Pillow's Image.LINEAR,
numpy aliases, the missing _C) that detectron2 needs at import time.

FRN's compiled kernels cost seconds of compilation per graph on a cold cache; tests
outside the FRN layer tests (which select implementations explicitly) use the eager op, which
gives the same numbers (tested in test_layers_frn.py). Subprocesses inherit the setting.
"""
import os

os.environ.setdefault("D2_NORMS_FRN_IMPL", "eager")

import d2_norms  # noqa: E402,F401

import importlib.util  # noqa: E402
import signal  # noqa: E402
import socket  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# detectron2 main's snapshot with its model-zoo configs (the v0.6 sdist ships none); CI has it
D2_SNAPSHOT = os.path.join(os.path.dirname(REPO), "shared", "third_party",
                           "detectron2-02b5c4e2.tar.gz")


def _sigkill_at_checkpoint(cmd, out_dir, after_checkpoint, *, env=None, cwd=None,
                           timeout=600.0) -> str:
    """Start ``cmd`` (a training run writing into ``out_dir``), SIGKILL it as soon as its
    ``last_checkpoint`` names ``after_checkpoint`` or a later one, and return that name. A run
    that ends on its own first, or never gets there within ``timeout`` s, fails the test."""
    proc = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    pointer = os.path.join(out_dir, "last_checkpoint")
    deadline = time.time() + timeout
    try:
        while True:
            assert proc.poll() is None, "training ended before it could be killed"
            assert time.time() < deadline, f"no {after_checkpoint} after {timeout} s"
            if os.path.exists(pointer) and open(pointer).read() >= after_checkpoint:
                break
            time.sleep(0.02)
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    assert "model_final.pth" not in os.listdir(out_dir)
    return open(pointer).read()


@pytest.fixture
def sigkill_at_checkpoint():
    """The function above: kill a training run right after a given checkpoint (resume tests)."""
    return _sigkill_at_checkpoint


def _run_command(cmd, *, env, expect=0, timeout=900):
    """Run ``cmd`` in the repository root with environment ``env`` and return the completed
    process; unless ``expect`` is None, its exit status must be ``expect`` (the tails of its
    stdout and stderr are the assertion message)."""
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=REPO)
    if expect is not None:
        assert out.returncode == expect, out.stdout[-3000:] + out.stderr[-6000:]
    return out


@pytest.fixture(scope="session")
def run_command():
    """The function above: a tool or training run as a subprocess, its exit status checked."""
    return _run_command


def _load_tool(name):
    """``tools/<name>.py`` imported as a module (to call its functions in this process)."""
    spec = importlib.util.spec_from_file_location(f"d2n_tool_{name}",
                                                  os.path.join(REPO, "tools", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def load_tool():
    """The function above: ``load_tool("ap_table")`` is tools/ap_table.py as a module."""
    return _load_tool


def _free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now (for a gloo group or torchrun)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def free_port():
    """The function above."""
    return _free_port


def _assert_bitwise_equal(a, b, where="", *, dtype=True):
    """``a`` and ``b`` (nested dicts / lists / tuples of tensors and plain values, e.g. state
    dicts) are the same: same keys and lengths, tensors ``torch.equal`` (and of the same dtype
    unless ``dtype`` is False), other values ``==``; ``where`` names the path in a failure."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and (not dtype or a.dtype == b.dtype) \
            and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            _assert_bitwise_equal(a[k], b[k], f"{where}.{k}", dtype=dtype)
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_bitwise_equal(x, y, f"{where}[{i}]", dtype=dtype)
    else:
        assert a == b, where


@pytest.fixture(scope="session")
def assert_bitwise_equal():
    """The function above (a resumed run against an uninterrupted one)."""
    return _assert_bitwise_equal


@pytest.fixture(scope="module")
def one_torch_thread():
    """torch on one thread for a module's tests (``pytest.mark.usefixtures``), then as before."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="module")
def eager_frn_one_thread():
    """The eager FRN kernel (the compiled one costs seconds to compile; the layer tests cover
    it) and one torch thread (outputs independent of the core count) for a module's tests."""
    import d2_norms.layers as L

    old_impl, old_threads = L.get_frn_impl(), torch.get_num_threads()
    L.set_frn_impl("eager")
    torch.set_num_threads(1)
    yield
    L.set_frn_impl(old_impl)
    torch.set_num_threads(old_threads)


@pytest.fixture
def register_coco():
    """``register_coco(name, json_file, image_root)`` registers a COCO-format set with
    detectron2 for this test; every set registered so is removed afterwards."""
    from detectron2.data import DatasetCatalog, MetadataCatalog
    from detectron2.data.datasets import register_coco_instances

    names = []

    def register(name, json_file, image_root):
        register_coco_instances(name, {}, str(json_file), str(image_root))
        names.append(name)
        return name
    yield register
    for name in names:
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)


@pytest.fixture(scope="session")
def stock_configs_dir(tmp_path_factory):
    """detectron2's own ``configs/`` (yacs model zoo and LazyConfigs) from the snapshot; its
    ``tools/`` next to it (``stock_tools_dir``)."""
    import tarfile

    if not os.path.exists(D2_SNAPSHOT):
        pytest.skip(f"detectron2 snapshot with the model-zoo configs not found at {D2_SNAPSHOT} "
                    "(../shared/third_party, present in CI only)")
    root = tmp_path_factory.mktemp("d2_snapshot")
    with tarfile.open(D2_SNAPSHOT) as tar:
        members = [m for m in tar.getmembers()
                   if any(m.name.startswith(d) or f"/{d}" in m.name
                          for d in ("configs/", "tools/"))]
        tar.extractall(root, members=members, filter="data")
    for dirpath, dirnames, _ in os.walk(root):
        if "configs" in dirnames and os.path.exists(os.path.join(dirpath, "configs",
                                                                 "Base-RCNN-FPN.yaml")):
            return os.path.join(dirpath, "configs")
    pytest.fail(f"no configs/ with Base-RCNN-FPN.yaml in {D2_SNAPSHOT}")


@pytest.fixture(scope="session")
def stock_tools_dir(stock_configs_dir):
    """detectron2's own ``tools/`` (``lazyconfig_train_net.py``, ...) from the snapshot."""
    tools = os.path.join(os.path.dirname(stock_configs_dir), "tools")
    if not os.path.isfile(os.path.join(tools, "lazyconfig_train_net.py")):
        pytest.fail(f"no tools/lazyconfig_train_net.py next to {stock_configs_dir}")
    return tools
