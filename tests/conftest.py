"""Shared test set-up.

``import d2_norms`` comes first: it applies the detectron2 v0.6 shims (Pillow's Image.LINEAR,
numpy aliases, the missing _C) that detectron2 needs at import time.

FRN's compiled kernel costs ~40 s of one-off compilation per process on a cold cache; tests
outside the FRN layer tests (which select implementations explicitly) use the eager op, which
gives the same numbers (tested in test_layers_frn.py). Subprocesses inherit the setting.
"""
import os

os.environ.setdefault("D2_NORMS_FRN_IMPL", "eager")

import d2_norms  # noqa: E402,F401

import signal  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402

import pytest  # noqa: E402


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
