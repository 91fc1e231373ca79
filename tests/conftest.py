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
