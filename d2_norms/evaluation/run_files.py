"""The machine-readable files of a run directory: ``results.json`` and ``run_status.json``.

Both are written atomically (a temporary file in the same directory, then ``os.replace``), so a
reader never sees half a file, and only by the main process. The schemas are documented in
docs/evaluation.md; :func:`load_results` / :func:`load_run_status` check them and raise
:class:`RunFileError` with the path and what to do when a file is missing or malformed.

What a run *is* (detector, normalizer, images per GPU) comes from its config through
:func:`describe_run`, which accepts a live ``CfgNode`` or the nested dict of a dumped
``config.yaml``.
"""
import datetime
import importlib.metadata
import json
import math
import os
import platform
import re
import socket
import sys
from typing import Any, Dict, List, Mapping, Optional

from d2_norms.config import get_dotted, meta_architecture_family
from d2_norms.fileio import atomic_write_text

from .backends import COCO_METRICS, IOU_TYPES

RESULTS_FILE = "results.json"
RUN_STATUS_FILE = "run_status.json"
CONFIG_FILE = "config.yaml"
# The yacs settings of a LazyConfig run (d2_norms.lazy.engine.SETTINGS_FILE).
LAZY_SETTINGS_FILE = "settings.yaml"
METRICS_FILE = "metrics.json"
RESULTS_SCHEMA_VERSION = 1
RUN_STATUS_SCHEMA_VERSION = 1
RUN_STATES = ("running", "finished", "failed")

RE_EVAL_HINT = (
    "re-create it by evaluating the run's checkpoint: tools/train_net.py --eval-only "
    "--config-file RUN_DIR/config.yaml MODEL.WEIGHTS RUN_DIR/model_final.pth OUTPUT_DIR RUN_DIR"
)


class RunFileError(ValueError):
    """A results / status / config file of a run directory is missing or malformed."""

    def __init__(self, path: str, problem: str, hint: str = ""):
        self.path = str(path)
        self.problem = problem
        self.hint = hint
        super().__init__(f"{self.path}: {problem}" + (f"; {hint}" if hint else ""))


# ----------------------------------------------------------------------------- helpers


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def _json_safe(obj: Any) -> Any:
    """NaN / inf -> null (strict JSON has no NaN); numpy scalars -> Python numbers."""
    if isinstance(obj, Mapping):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    if hasattr(obj, "item") and not isinstance(obj, (str, bytes)):  # numpy / torch scalar
        try:
            obj = obj.item()
        except (ValueError, TypeError):
            pass
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def atomic_write_json(path: str, payload: Mapping) -> None:
    """Write ``payload`` as strict JSON to ``path`` through a temporary file + rename."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    try:
        text = json.dumps(_json_safe(payload), indent=2, sort_keys=False, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise TypeError(f"cannot write {path}: the content is not JSON-serializable ({e})") from e
    atomic_write_text(path, text + "\n")


def _read_json(path: str, what: str, hint: str = "") -> Any:
    if not os.path.exists(path):
        raise RunFileError(path, f"{what} not found", hint)
    try:
        with open(path) as f:
            text = f.read()
    except OSError as e:
        raise RunFileError(path, f"cannot read {what} ({e.strerror})", hint) from e
    if not text.strip():
        raise RunFileError(path, f"{what} is empty (the writer was interrupted?)", hint)
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise RunFileError(
            path, f"{what} is not valid JSON (line {e.lineno}, column {e.colno}: {e.msg})", hint
        ) from e


def _main_process() -> bool:
    try:
        from detectron2.utils import comm

        return comm.is_main_process()
    except ImportError:  # pragma: no cover - detectron2 is a hard dependency
        return True


def _world_size() -> int:
    from detectron2.utils import comm

    return comm.get_world_size()


def package_versions() -> Dict[str, Optional[str]]:
    """Versions that determine the numbers: d2_norms, detectron2, torch, eval backends, python."""
    out: Dict[str, Optional[str]] = {"python": platform.python_version()}
    for dist in ("d2_norms", "detectron2", "torch", "torchvision", "numpy", "faster-coco-eval",
                 "pycocotools"):
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[dist] = None
    if out["d2_norms"] is None:
        import d2_norms

        out["d2_norms"] = getattr(d2_norms, "__version__", None)
    if out["detectron2"] is None and "detectron2" in sys.modules:
        out["detectron2"] = getattr(sys.modules["detectron2"], "__version__", None)
    return out


# ----------------------------------------------------------------------------- run description


def norm_display_name(norm: Any) -> str:
    """How a normalizer name is shown in tables: registry names as they are, "" -> "none"."""
    if norm is None:
        return "?"
    if callable(norm) and not isinstance(norm, str):
        return getattr(norm, "__name__", repr(norm))
    return str(norm) if str(norm) else "none"


_NF_NAME = re.compile(r"(^|[_\-])nf([_\-]|$)", re.IGNORECASE)


def describe_run(cfg: Mapping, world_size: Optional[int] = None) -> Dict[str, Any]:
    """Detector, normalizer(s) and batch layout of a run, from its config.

    ``cfg``: a detectron2 ``CfgNode`` or the dict of a dumped config.yaml. ``world_size``: the
    number of training processes when known (at run time); see :func:`images_per_gpu`.
    """
    meta = meta_architecture_family(get_dotted(cfg, "MODEL.META_ARCHITECTURE", "?"))
    mask_on = bool(get_dotted(cfg, "MODEL.MASK_ON", False))
    detector = {"RetinaNet": "RetinaNet",
                "GeneralizedRCNN": "Mask R-CNN" if mask_on else "Faster R-CNN"}.get(meta, meta)
    backbone = str(get_dotted(cfg, "MODEL.BACKBONE.NAME", "?"))
    depth = get_dotted(cfg, "MODEL.RESNETS.DEPTH")
    fpn = "fpn" in backbone.lower()
    if depth is not None:
        backbone_label = f"R{depth}" + ("-FPN" if fpn else "")
    else:
        backbone_label = backbone
    nf = bool(_NF_NAME.search(backbone))

    norms = {"backbone": get_dotted(cfg, "MODEL.RESNETS.NORM", "")}
    if fpn:
        norms["fpn"] = get_dotted(cfg, "MODEL.FPN.NORM", "")
    if meta == "RetinaNet":
        norms["head"] = get_dotted(cfg, "MODEL.RETINANET.NORM", "")
    elif meta == "GeneralizedRCNN":
        norms["box_head"] = get_dotted(cfg, "MODEL.ROI_BOX_HEAD.NORM", "")
        if mask_on:
            norms["mask_head"] = get_dotted(cfg, "MODEL.ROI_MASK_HEAD.NORM", "")
    norms = {k: norm_display_name(v) for k, v in norms.items()}
    # Rows of the comparison tables are named after the backbone's normalizer, as in FRN Table 6
    # / GN Table 7; "normalizer_detail" also names the parts normalized differently (ap_table
    # uses it when runs of one backbone normalizer differ there, instead of averaging them).
    nf = nf or norms["backbone"] == "NF"
    normalizer = "NF" if nf else norms["backbone"]
    others = [f"{part}: {name}" for part, name in norms.items()
              if part != "backbone" and name != norms["backbone"]]
    detail = normalizer + (f" ({', '.join(others)})" if others else "")

    ipg, ipg_source = images_per_gpu(cfg, world_size)
    total_batch = None
    procs = world_size if world_size else (get_dotted(cfg, "SOLVER.REFERENCE_WORLD_SIZE", 0) or None)
    if ipg is not None and procs:
        total_batch = ipg * procs
    return {
        "detector": detector,
        "meta_architecture": meta,
        "backbone": backbone,
        "depth": depth,
        "detector_label": f"{detector} {backbone_label}",
        "normalizer": normalizer,
        "normalizer_detail": detail,
        "norms": norms,
        "images_per_gpu": ipg,
        "images_per_gpu_source": ipg_source,
        "total_batch": total_batch,
        "ims_per_batch": get_dotted(cfg, "SOLVER.IMS_PER_BATCH"),
        "reference_world_size": get_dotted(cfg, "SOLVER.REFERENCE_WORLD_SIZE", 0),
        "world_size": world_size,
        "max_iter": get_dotted(cfg, "SOLVER.MAX_ITER"),
        "base_lr": get_dotted(cfg, "SOLVER.BASE_LR"),
        "min_size_test": get_dotted(cfg, "INPUT.MIN_SIZE_TEST"),
        "train_datasets": list(get_dotted(cfg, "DATASETS.TRAIN", []) or []),
        "test_datasets": list(get_dotted(cfg, "DATASETS.TEST", []) or []),
        "output_dir": get_dotted(cfg, "OUTPUT_DIR"),
        "seed": get_dotted(cfg, "SEED"),
    }


def images_per_gpu(cfg: Mapping, world_size: Optional[int] = None):
    """Images per GPU (per process) of a run, and where the number came from.

    SOLVER.IMS_PER_BATCH is the total batch. With SOLVER.REFERENCE_WORLD_SIZE = R > 0 the config
    was written for R GPUs and detectron2 rescales IMS_PER_BATCH with the actual world size, so
    per-GPU images are IMS_PER_BATCH // R in both the written and the rescaled config. With R = 0
    the batch is split over the actual processes: IMS_PER_BATCH // world_size, where world_size is
    recorded at run time (results.json / run_status.json); from a bare config.yaml one process is
    assumed and the source says so.
    """
    total = get_dotted(cfg, "SOLVER.IMS_PER_BATCH")
    if total is None:
        return None, "unknown (no SOLVER.IMS_PER_BATCH)"
    ref = int(get_dotted(cfg, "SOLVER.REFERENCE_WORLD_SIZE", 0) or 0)
    if ref > 0:
        divisor, source = ref, f"IMS_PER_BATCH {total} / REFERENCE_WORLD_SIZE {ref}"
    elif world_size:
        divisor, source = int(world_size), f"IMS_PER_BATCH {total} / world size {world_size}"
    else:
        divisor, source = 1, f"IMS_PER_BATCH {total}, world size unknown: assumed 1 process"
    ipg = total / divisor
    return (int(ipg) if float(ipg).is_integer() else ipg), source


# ----------------------------------------------------------------------------- results.json


def _task_metrics(task_results: Mapping, where: str) -> Dict[str, Optional[float]]:
    missing = [m for m in COCO_METRICS if m not in task_results]
    if missing:
        raise ValueError(
            f"{where} lacks COCO metric(s) {missing}; pass the dict returned by the evaluator "
            "(build_evaluator / inference_on_dataset)"
        )
    return {m: float(task_results[m]) for m in COCO_METRICS}


def _split_results(results: Mapping, dataset_names: List[str]) -> Dict[str, Mapping]:
    """Map each dataset name to its {task: {metric: value}} dict.

    Detectron2's ``DefaultTrainer.test`` returns the task dict directly for one test set and
    {dataset: task dict} for several.
    """
    if not isinstance(results, Mapping) or not results:
        raise ValueError(
            f"save_results got no evaluation results ({results!r}); was the evaluation run on the "
            "main process, and did the model produce detections?"
        )
    if all(name in results for name in dataset_names):
        return {name: results[name] for name in dataset_names}
    if len(dataset_names) == 1 and any(t in results for t in IOU_TYPES):
        return {dataset_names[0]: results}
    raise ValueError(
        f"save_results: results have keys {sorted(results)} but datasets {dataset_names} were "
        "named; pass dataset_name as it appears in cfg.DATASETS.TEST (comma-separated for several)"
    )


def save_results(output_dir: str, results: Mapping, cfg, iteration: Optional[int],
                 dataset_name: str, *, backend: Optional[str] = None) -> Optional[str]:
    """Write (or update) ``output_dir/results.json`` with the evaluation of ``dataset_name``.

    results: what the evaluator / ``DefaultTrainer.test`` returned ({task: {metric: value}}, or
        {dataset: {task: ...}} for several test sets). dataset_name: one name, or several joined
        by commas. iteration: the training iteration of the evaluated weights (None if unknown).
    Entries of other datasets already in the file are kept; the same dataset is replaced.
    Only the main process writes; returns the path there and None elsewhere.
    """
    if not _main_process():
        return None
    names = [n.strip() for n in str(dataset_name).split(",") if n.strip()]
    if not names:
        raise ValueError("save_results: dataset_name is empty")
    per_dataset = _split_results(results, names)
    if backend is None:
        # The backend build_evaluator used for this config (same default: "auto").
        from .backends import AUTO, resolve_backend

        backend = get_dotted(cfg, "D2NORMS.EVAL.BACKEND", AUTO)
        try:
            backend = resolve_backend(backend)
        except (ImportError, ValueError):
            pass
    path = os.path.join(output_dir, RESULTS_FILE)
    evaluations: Dict[str, Any] = {}
    if os.path.exists(path):
        try:
            evaluations = dict(load_results(path)["evaluations"])
        except RunFileError:
            evaluations = {}  # replaced below; a corrupt file must not block new results
    timestamp = _now()
    for name, task_results in per_dataset.items():
        if not isinstance(task_results, Mapping):
            raise ValueError(f"save_results: results for {name!r} are not a dict: {task_results!r}")
        metrics = {}
        per_category = {}
        for task, values in task_results.items():
            if task not in IOU_TYPES:
                continue  # e.g. box_proposals: not part of the AP tables
            metrics[task] = _task_metrics(values, f"results[{name!r}][{task!r}]")
            per_category[task] = {k[3:]: float(v) for k, v in values.items()
                                  if isinstance(k, str) and k.startswith("AP-")}
        if not metrics:
            raise ValueError(
                f"save_results: no bbox/segm metrics for {name!r} "
                f"(got tasks {sorted(task_results)})"
            )
        evaluations[name] = {
            "iteration": None if iteration is None else int(iteration),
            "metrics": metrics,
            "per_category_ap": per_category,
            "eval_backend": backend,
            "timestamp": timestamp,
        }
    payload = {
        "schema_version": RESULTS_SCHEMA_VERSION,
        "run": describe_run(cfg, world_size=_world_size()),
        "evaluations": evaluations,
        "versions": package_versions(),
        "timestamp": timestamp,
    }
    atomic_write_json(path, payload)
    return path


def load_results(path: str) -> Dict[str, Any]:
    """Read and check a results.json; :class:`RunFileError` says what is wrong and how to fix it."""
    data = _read_json(path, RESULTS_FILE, RE_EVAL_HINT)
    if not isinstance(data, dict):
        raise RunFileError(path, f"expected a JSON object, found {type(data).__name__}",
                           RE_EVAL_HINT)
    version = data.get("schema_version")
    if version != RESULTS_SCHEMA_VERSION:
        raise RunFileError(
            path, f"unsupported schema_version {version!r} (this d2_norms reads "
            f"{RESULTS_SCHEMA_VERSION}); it was not written by d2_norms.evaluation.save_results",
            RE_EVAL_HINT)
    run = data.get("run")
    if not isinstance(run, dict):
        raise RunFileError(path, "missing the 'run' object (detector, normalizer, ...)",
                           RE_EVAL_HINT)
    for key in ("detector_label", "normalizer", "images_per_gpu"):
        if key not in run:
            raise RunFileError(path, f"'run' lacks {key!r}", RE_EVAL_HINT)
    evaluations = data.get("evaluations")
    if not isinstance(evaluations, dict) or not evaluations:
        raise RunFileError(path, "no 'evaluations' (dataset -> metrics)", RE_EVAL_HINT)
    for ds, entry in evaluations.items():
        metrics = entry.get("metrics") if isinstance(entry, dict) else None
        if not isinstance(metrics, dict) or not metrics:
            raise RunFileError(path, f"evaluation of {ds!r} has no 'metrics'", RE_EVAL_HINT)
        for task, values in metrics.items():
            if task not in IOU_TYPES or not isinstance(values, dict):
                raise RunFileError(path, f"evaluation of {ds!r}: unknown task {task!r}",
                                   RE_EVAL_HINT)
            for m in COCO_METRICS:
                v = values.get(m, "missing")
                if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float))):
                    raise RunFileError(
                        path, f"evaluation of {ds!r}: {task} {m} is {v!r}, expected a number or "
                        "null", RE_EVAL_HINT)
    return data


# ----------------------------------------------------------------------------- run_status.json


def write_run_status(output_dir: str, state: str, **info) -> Optional[str]:
    """Record that the run in ``output_dir`` is running / finished / failed (run_status.json).

    ``info``: JSON-serializable extras (iteration, max_iter, error, ...). ``started_at`` is set
    by "running" and kept by the later states; ``world_size`` (training processes) is recorded
    so that images per GPU can be derived while the run has no results yet. Main process only;
    returns the path there, None elsewhere.
    """
    if state not in RUN_STATES:
        raise ValueError(f"run state must be one of {RUN_STATES}, got {state!r}")
    if not _main_process():
        return None
    path = os.path.join(output_dir, RUN_STATUS_FILE)
    started_at = None
    if os.path.exists(path):
        try:
            previous = _read_json(path, RUN_STATUS_FILE)
            if isinstance(previous, dict):
                started_at = previous.get("started_at")
        except RunFileError:
            pass
    now = _now()
    if state == "running":
        started_at = now  # each (re)start of training
    payload = {
        "schema_version": RUN_STATUS_SCHEMA_VERSION,
        "state": state,
        "started_at": started_at,
        "updated_at": now,
        "world_size": _world_size(),
        "pid": os.getpid(),
        "host": socket.gethostname(),
    }
    reserved = set(payload) & set(info)
    if reserved - {"world_size"}:
        raise ValueError(f"write_run_status: {sorted(reserved)} are set by the function itself")
    payload.update(info)
    atomic_write_json(path, payload)
    return path


def load_run_status(path: str) -> Dict[str, Any]:
    data = _read_json(path, RUN_STATUS_FILE)
    if not isinstance(data, dict) or data.get("state") not in RUN_STATES:
        state = data.get("state") if isinstance(data, dict) else None
        raise RunFileError(
            path, f"'state' is {state!r}, expected one of {RUN_STATES}",
            "the file is written by d2_norms.evaluation.write_run_status; delete it to let "
            "ap_table infer the state from results.json")
    return data


def last_logged_iteration(path: str) -> Optional[int]:
    """The last ``iteration`` in detectron2's metrics.json (JSON lines), None if unreadable.

    A line cut off by a running writer is skipped.
    """
    if not os.path.exists(path):
        return None
    last = None
    try:
        with open(path) as f:
            for line in f:
                line = line.strip()
                if not line:
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if isinstance(record, dict) and isinstance(record.get("iteration"), int):
                    last = record["iteration"]
    except OSError:
        return None
    return last


def load_config_yaml(path: str) -> Dict[str, Any]:
    """The dumped detectron2 config of a run as nested dicts (no d2 keys need registering)."""
    import yaml

    if not os.path.exists(path):
        raise RunFileError(
            path, "config.yaml not found: not a detectron2 output directory, or the run did not "
            "get past set-up", "pass directories that tools/train_net.py wrote (OUTPUT_DIR)")
    try:
        with open(path) as f:
            data = yaml.safe_load(f)
    except yaml.YAMLError as e:
        raise RunFileError(path, f"config.yaml is not valid YAML ({e})") from e
    if isinstance(data, dict) and "MODEL" not in data and ("train" in data or "model" in data):
        # A LazyConfig run (tools/lazyconfig_train_net.py): config.yaml is the LazyConfig, the
        # yacs settings the engine ran with are next to it.
        settings = os.path.join(os.path.dirname(path), LAZY_SETTINGS_FILE)
        if not os.path.exists(settings):
            raise RunFileError(path, f"a LazyConfig run without its {LAZY_SETTINGS_FILE}",
                               "the run did not get past set-up; rerun it")
        return load_config_yaml(settings)
    if not isinstance(data, dict) or "MODEL" not in data:
        raise RunFileError(path, "config.yaml has no MODEL section; it is not a detectron2 config")
    return data
