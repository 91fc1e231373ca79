"""Shared test set-up. ``import d2_norms`` comes first: it applies the detectron2 v0.6 shims
(Pillow's Image.LINEAR, numpy aliases, the missing _C) that detectron2 needs at import time."""
import d2_norms  # noqa: F401
