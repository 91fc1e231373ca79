"""Check an exported TorchScript file where it will run, and write it only when the check passes.

* :data:`LOAD_CODE` / :data:`CALL_CODE` - the code that loads and calls an exported file: torch
  and torchvision only (torchvision registers ``torchvision::nms``, which the graphs call); no
  detectron2, no d2_norms. docs/export.md shows it verbatim (tested) and the schema file holds it.
* :func:`run_in_fresh_process` - runs exactly that code in a new Python process
  (``sys.executable``) on the check images and returns the outputs; an
  :class:`~d2_norms.export.ExportError` says why when the file does not load or run there, or
  when the process imported detectron2 / d2_norms.
* :func:`input_spec` - what the exported model expects as input (the schema file's ``"input"``).
* :func:`write_checked_export` - ``model.ts`` + ``model.schema.json``: both written under
  temporary names in the output directory, the model file checked in a fresh process against the
  eager reference, renamed only when the check passes; on any failure the temporary files (and an
  output directory this call created) are removed, and files already there are left as they were.
"""
import hashlib
import io
import json
import os
import subprocess
import sys
import tempfile
from typing import Dict, List, Optional, Sequence

import torch

from .export import (ExportedModel, ExportError, compare_outputs, flat_output_names,
                     output_fields)
from .fileio import _fsync_dir, temp_name

__all__ = [
    "LOAD_CODE",
    "CALL_CODE",
    "MODEL_FILE",
    "SCHEMA_FILE",
    "SCHEMA_VERSION",
    "ExportCheckError",
    "run_in_fresh_process",
    "input_spec",
    "write_checked_export",
]

MODEL_FILE = "model.ts"
SCHEMA_FILE = "model.schema.json"
SCHEMA_VERSION = 1

# The code a deployment runs (with `path`, `device` and a CHW float `image` defined). The fresh-
# process check runs these lines as they are; docs/export.md quotes them (tests/test_export.py).
LOAD_CODE = """\
import torch
import torchvision  # noqa: F401  (registers torchvision::nms, which the exported graph calls)

model = torch.jit.load(path, map_location=device)
"""
CALL_CODE = {
    "trace": "outputs = model(image)  # a tuple of tensors, in the schema's order",
    "script": 'outputs = model([{"image": image}])[0]  # {name: tensor}, as in the schema',
}

# Run in a new interpreter with cwd = an empty temporary directory (sys.path[0] = "" finds
# nothing there). argv: path, method, device, torch threads, inputs file, outputs file.
_CHILD = """\
import sys

path, method, device, threads, inputs_file, outputs_file = sys.argv[1:7]
{load}
torch.set_num_threads(int(threads))
results = []
with torch.no_grad():
    for image in torch.load(inputs_file):
        image = image.to(device)
        {call}
        if isinstance(outputs, dict):
            results.append({{k: v.cpu() for k, v in outputs.items()}})
        else:
            results.append([v.cpu() for v in outputs])
imported = sorted({{m.split(".")[0] for m in sys.modules}} & {{"detectron2", "d2_norms"}})
torch.save({{"outputs": results, "imported": imported}}, outputs_file)
"""


class ExportCheckError(ExportError):
    """The exported file was written to a temporary name but failed its check (it does not
    load or run in a fresh process, or its outputs differ from eager); nothing was kept."""

    def __init__(self, message: str, diffs: Optional[Dict[str, float]] = None):
        super().__init__(message)
        self.diffs = diffs or {}


def _tail(text: str, lines: int = 12) -> str:
    kept = [line for line in text.strip().splitlines() if "Warning" not in line
            and not line.startswith("  warnings.warn")]
    return "\n".join(kept[-lines:])


def run_in_fresh_process(path: str, method: str, images: Sequence[torch.Tensor], *,
                         device: str = "cpu", threads: Optional[int] = None,
                         timeout: float = 600.0) -> List:
    """Load ``path`` with :data:`LOAD_CODE` in a new Python process (``sys.executable``) that
    imports torch and torchvision only, call it on each CHW image with ``CALL_CODE[method]`` and
    return its outputs per image (trace: the list of output tensors; script: the dict), on CPU.

    ``threads``: torch threads there (default: this process's, so that results are comparable).
    Raises ExportCheckError with the end of its error output when the file does not load or run
    there, or when that process imported detectron2 or d2_norms."""
    if method not in CALL_CODE:
        raise ExportError(f"export method {method!r} is not supported; use one of "
                          f"{', '.join(CALL_CODE)}")
    code = _CHILD.format(load=LOAD_CODE, call=CALL_CODE[method])
    threads = threads if threads is not None else torch.get_num_threads()
    with tempfile.TemporaryDirectory(prefix="d2n_export_check_") as tmp:
        inputs_file = os.path.join(tmp, "inputs.pt")
        outputs_file = os.path.join(tmp, "outputs.pt")
        torch.save([img.detach().cpu() for img in images], inputs_file)
        cmd = [sys.executable, "-c", code, os.path.abspath(path), method, str(device),
               str(threads), inputs_file, outputs_file]
        try:
            proc = subprocess.run(cmd, cwd=tmp, capture_output=True, text=True,
                                  timeout=timeout)
        except subprocess.TimeoutExpired:
            raise ExportCheckError(f"the exported file did not load and run within {timeout:g} s "
                                   f"in a fresh Python process") from None
        if proc.returncode != 0:
            raise ExportCheckError(
                "the exported file does not load and run in a fresh Python process with torch "
                f"and torchvision only (as where it is deployed):\n{_tail(proc.stderr)}")
        result = torch.load(outputs_file, map_location="cpu")
    if result["imported"]:
        raise ExportCheckError(f"loading the exported file imported {result['imported']}: it "
                               "must run with torch and torchvision only")
    return result["outputs"]


def _as_fields(exported: ExportedModel, raw) -> Dict[str, torch.Tensor]:
    if exported.method == "trace":
        return exported.from_flat(raw)
    return {name: raw[name] for name in exported.names}


def input_spec(model, image: torch.Tensor, resize: Optional[dict] = None) -> dict:
    """What the exported model takes: a float32 CHW image tensor with 0-255 values in the
    model's channel order; it normalizes (PIXEL_MEAN / PIXEL_STD) and pads inside. ``resize``:
    how images were resized for the check (e.g. ``{"shortest_edge": 800, "max_size": 1333}``)."""
    def as_list(t):
        return [float(f"{v:.7g}") for v in t.flatten().tolist()]

    backbone = getattr(model, "backbone", None)
    spec = {
        "image": "float32 tensor (3, H, W), values 0-255 (not normalized), on the device the "
                 "model was loaded to",
        "channels": getattr(model, "input_format", None) or "BGR",
        "normalized_inside": "(image - pixel_mean) / pixel_std, then padded to a multiple of "
                             "size_divisibility",
        "pixel_mean": as_list(model.pixel_mean),
        "pixel_std": as_list(model.pixel_std),
        "size_divisibility": int(getattr(backbone, "size_divisibility", 0) or 0),
        "check_image_shape": list(image.shape),
    }
    if resize:
        spec["resize"] = resize
    return spec


def _write_synced(path: str, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def write_checked_export(exported: ExportedModel, reference: List[Dict[str, torch.Tensor]],
                         inputs, output_dir: str, schema: dict, *, atol: float,
                         device: str = "cpu", timeout: float = 600.0) -> dict:
    """Write ``<output_dir>/model.ts`` and ``model.schema.json`` only if the file passes the
    check: loaded and run in a fresh process (:func:`run_in_fresh_process`) on ``inputs``, its
    outputs differ from ``reference`` (:func:`~d2_norms.export.run_eager`) by at most ``atol``.

    ``schema``: the schema file's content so far (model, input, ...); this adds the file name,
    sha256, the loading code, the outputs (:func:`~d2_norms.export.output_fields`) and the check's
    result. Returns the written schema. Raises ExportCheckError when the check fails (nothing is
    left: temporary files removed, an output directory created here removed, existing files
    unchanged)."""
    # the outermost directory this call creates (removed again if the check fails)
    created = None
    parent = os.path.abspath(output_dir)
    while not os.path.exists(parent):
        created, parent = parent, os.path.dirname(parent)
    model_path = os.path.join(output_dir, MODEL_FILE)
    schema_path = os.path.join(output_dir, SCHEMA_FILE)
    tmp_model, tmp_schema = temp_name(model_path), temp_name(schema_path)
    buffer = io.BytesIO()
    torch.jit.save(exported.module, buffer)
    data = buffer.getvalue()
    os.makedirs(output_dir, exist_ok=True)
    try:
        _write_synced(tmp_model, data)
        images = [x["image"] for x in inputs]
        raw = run_in_fresh_process(tmp_model, exported.method, images, device=device,
                                   timeout=timeout)
        actual = [_as_fields(exported, r) for r in raw]
        try:
            diffs = compare_outputs(reference, actual)
        except ExportError as e:
            raise ExportCheckError(f"the exported file's outputs differ from eager: {e}") from None
        worst = max(diffs.values()) if diffs else 0.0
        if not worst <= atol:
            raise ExportCheckError(f"exported outputs differ from eager by {worst:.3g} > atol "
                                   f"{atol:g} ({diffs})", diffs)
        if exported.method == "trace":
            sample = dict(zip(flat_output_names(exported.schema), raw[0]))
        else:
            sample = raw[0]
        out = {"schema_version": SCHEMA_VERSION, "file": MODEL_FILE,
               "sha256": hashlib.sha256(data).hexdigest(), "method": exported.method}
        out.update((k, v) for k, v in schema.items() if k not in out)
        out.update({
            "requires": ["torch", "torchvision"],
            "load": LOAD_CODE + CALL_CODE[exported.method] + "\n",
            "output_container": (
                "tuple of tensors, in the order of 'outputs' (one image per call)"
                if exported.method == "trace" else
                "list with one dict {name: tensor} per input image, keys as in 'outputs'"),
            "outputs": output_fields(exported, sample),
        })
        if exported.method == "trace":
            out["input"] = dict(out.get("input") or {}, traced_image_shape=list(
                inputs[0]["image"].shape), traced_note=(
                "a trace is specialised to the traced image in places (detectron2's caveat): "
                "check other image sizes, or export with method 'script'"))
        check = dict(out.get("check") or {})
        check.update({"fresh_process": True, "atol": atol, "max_abs_diff": diffs,
                      "detections": [int(r["scores"].numel()) for r in reference]})
        out["check"] = check
        _write_synced(tmp_schema, (json.dumps(out, indent=1) + "\n").encode("utf-8"))
        os.replace(tmp_model, model_path)
        os.replace(tmp_schema, schema_path)
        _fsync_dir(os.path.abspath(output_dir))
        return out
    except BaseException:
        for tmp in (tmp_model, tmp_schema):
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass
        if created is not None:
            leaf = os.path.abspath(output_dir)
            while True:  # created dirs, innermost first, if empty (os.rmdir fails otherwise)
                try:
                    os.rmdir(leaf)
                except OSError:
                    break
                if leaf == created:
                    break
                leaf = os.path.dirname(leaf)
        raise
