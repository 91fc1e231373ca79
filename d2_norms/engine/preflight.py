"""Checks run by ``tools/train_net.py`` before it starts worker processes or writes anything into
OUTPUT_DIR, so that bad input fails once, early, with a message naming the fix, and never
overwrites a run's files (its ``config.yaml``, checkpoints or results).

* :func:`load_config` - a config key typo names the file it is in and suggests close keys;
* :func:`check_batch_split` - the total batch must split into whole images per process
  (replaces detectron2's bare ``assert`` in ``auto_scale_workers``);
* :func:`check_model_builds` - builds the model on the ``meta`` device (no memory, no compute)
  so that an unknown normalizer name or GN groups that do not divide a layer are reported with
  the config keys that hold the norm names;
* :func:`weights_problems` / :func:`load_checked` - weights whose keys or shapes do not match
  the model are refused for ``--eval-only`` and ``--resume`` (a half-random model would be
  evaluated or trained on), with the keys listed and the run's own config suggested;
* dataset checks come from :func:`d2_norms.data.check_datasets`.
"""
import logging
import os
from typing import Any, Dict, List, Mapping, Optional, Tuple

import torch
import yaml
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import get_cfg

from d2_norms.config import add_d2_norms_config, get_dotted

from .errors import (BatchSizeError, ConfigFileError, ConfigKeyError, WeightsMismatchError,
                     flatten_keys, norm_settings, unknown_key_message)

logger = logging.getLogger("d2_norms.preflight")

# Keys detectron2 itself tolerates when absent or extra (DetectionCheckpointer._load_model):
# the input normalization comes from the config, anchors are recomputed.
_IGNORED_MISSING = ("pixel_mean", "pixel_std")
_IGNORED_FRAGMENT = "anchor_generator.cell_anchors"


# ------------------------------------------------------------------------------------------------
# Config
# ------------------------------------------------------------------------------------------------
def _base_chain(config_file: str) -> List[Tuple[str, Dict]]:
    """(path, parsed YAML) of ``config_file`` and its ``_BASE_`` files, bases first."""
    chain: List[Tuple[str, Dict]] = []

    def walk(path: str, depth: int = 0):
        if depth > 32:
            return
        try:
            with open(path) as f:
                data = yaml.safe_load(f) or {}
        except (OSError, yaml.YAMLError):
            return
        if not isinstance(data, dict):
            return
        bases = data.get("_BASE_")
        for base in ([bases] if isinstance(bases, str) else bases or []):
            base = os.path.expanduser(base)
            if not os.path.isabs(base):
                base = os.path.join(os.path.dirname(path), base)
            walk(base, depth + 1)
        chain.append((path, data))

    walk(config_file)
    return chain


_MISSING = object()


def _has_key(data: Mapping, dotted: str) -> bool:
    return get_dotted(data, dotted, _MISSING) is not _MISSING


def _key_from_message(message: str) -> Optional[str]:
    for marker in ("Non-existent config key:", "Non-existent key:"):
        if marker in message:
            return message.split(marker, 1)[1].strip().strip("'\"")
    return None


def load_config(config_file: str, opts: List[str]):
    """detectron2 config + d2_norms keys, merged from ``config_file`` and ``opts`` (not frozen).

    Raises ConfigFileError / ConfigKeyError with the file (or the command line) and close keys."""
    cfg = get_cfg()
    add_d2_norms_config(cfg)
    known = flatten_keys(cfg)
    if config_file:
        if not os.path.isfile(config_file):
            raise ConfigFileError(f"config file {config_file} does not exist (relative paths are "
                                  f"taken from the working directory {os.getcwd()})")
        try:
            cfg.merge_from_file(config_file)
        except KeyError as e:
            key = _key_from_message(str(e.args[0] if e.args else e))
            if key is None:
                raise
            files = [p for p, data in _base_chain(config_file) if _has_key(data, key)]
            where = " and ".join(files) if files else config_file
            if files and files[-1] != config_file:
                where += f" (a _BASE_ of {config_file})"
            raise ConfigKeyError(unknown_key_message(key, known, where)) from None
        except yaml.YAMLError as e:
            raise ConfigFileError(f"config file {config_file} (or one of its _BASE_ files) is not "
                                  f"valid YAML: {e}") from None
    if opts:
        if len(opts) % 2:
            raise ConfigKeyError(
                f"the command-line overrides must come in KEY VALUE pairs; got {len(opts)} words: "
                f"{' '.join(map(str, opts))}")
        try:
            cfg.merge_from_list(opts)
        except (KeyError, AssertionError) as e:
            key = _key_from_message(str(e.args[0] if e.args else e))
            if key is None:
                raise
            raise ConfigKeyError(unknown_key_message(key, known, "the command-line overrides")
                                 ) from None
    if cfg.MODEL.D2NORMS.NORM:
        apply_norm_field(cfg, config_file, opts)
    from d2_norms.config_checks import mark_norm_field_applied

    mark_norm_field_applied(cfg)
    return cfg


def apply_norm_field(cfg, config_file: str, opts: List[str]) -> Dict[str, Any]:
    """``MODEL.D2NORMS.NORM``, the one field: every key of
    :func:`d2_norms.recipes.normalizer_fields` that no YAML file of the chain and no
    command-line override sets gets the field's value (a key set there overrides the field).
    Returns what was set."""
    import difflib

    from d2_norms import recipes
    from d2_norms.config import meta_architecture_family
    from d2_norms.layers import UnknownNormError, detectron2_norm_names, registered_norms

    norm = str(cfg.MODEL.D2NORMS.NORM)
    family = meta_architecture_family(cfg.MODEL.META_ARCHITECTURE)
    detector = {"RetinaNet": "retinanet", "GeneralizedRCNN": "mask_rcnn"}.get(family)
    if detector is None:
        raise ConfigKeyError(f"MODEL.D2NORMS.NORM={norm!r}: the one-field normalizer knows "
                             f"RetinaNet and (Mask / Faster) R-CNN models, not "
                             f"{cfg.MODEL.META_ARCHITECTURE}; set the per-part NORM keys instead")
    try:
        fields = recipes.normalizer_fields(detector, norm)
    except UnknownNormError:
        names = sorted(set(registered_norms()) | set(detectron2_norm_names()))
        close = ([n for n in names if n.lower() == norm.lower()]
                 or difflib.get_close_matches(norm, names, n=3, cutoff=0.5))
        raise UnknownNormError(
            f"MODEL.D2NORMS.NORM={norm!r}: unknown normalizer"
            + (f" (did you mean {' or '.join(map(repr, close))}?)" if close else "")
            + f"; the recipe's: {', '.join(recipes.NORMALIZERS)}; registered: "
            f"{', '.join(names)}") from None
    explicit = {str(k) for k in (opts or [])[0::2]}
    chain = _base_chain(config_file) if config_file else []
    chosen = {}
    for key, value in fields.items():
        if key in explicit or any(_has_key(data, key) for _, data in chain):
            continue
        *parents, leaf = key.split(".")
        node = cfg
        for p in parents:
            node = node[p]
        node[leaf] = value
        chosen[key] = value
    return chosen


# ------------------------------------------------------------------------------------------------
# Batch split
# ------------------------------------------------------------------------------------------------
def _divisors(n: int) -> List[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def check_batch_split(cfg, world_size: int) -> None:
    """The total batch SOLVER.IMS_PER_BATCH must give every process a whole number of images,
    directly or after REFERENCE_WORLD_SIZE auto-scaling (which keeps IMS_PER_BATCH /
    REFERENCE_WORLD_SIZE images per GPU)."""
    total = int(cfg.SOLVER.IMS_PER_BATCH)
    ref = int(cfg.SOLVER.REFERENCE_WORLD_SIZE)
    if total < 1:
        raise BatchSizeError(f"SOLVER.IMS_PER_BATCH must be >= 1 (got {total})")
    if ref < 0:
        raise BatchSizeError(f"SOLVER.REFERENCE_WORLD_SIZE must be >= 0 (got {ref})")
    if ref:
        if total % ref:
            raise BatchSizeError(
                f"SOLVER.IMS_PER_BATCH={total} with SOLVER.REFERENCE_WORLD_SIZE={ref} means "
                f"{total}/{ref} = {total / ref:g} images per GPU, not a whole number. Set "
                f"IMS_PER_BATCH to (images per GPU) x {ref}, e.g. {max(1, total // ref) * ref}; "
                f"or REFERENCE_WORLD_SIZE to a divisor of {total} ({_divisors(total)}); or 0 to "
                "turn auto-scaling off.")
        return  # auto-scaling makes the total (images per GPU) x world_size
    if total % world_size:
        lower = (total // world_size) * world_size
        examples = ", ".join(str(x) for x in (lower, lower + world_size) if x > 0)
        raise BatchSizeError(
            f"SOLVER.IMS_PER_BATCH={total} images cannot be split evenly over {world_size} "
            f"processes (--num-gpus x --num-machines): {total} % {world_size} = "
            f"{total % world_size}. Use a total batch that is a multiple of {world_size} (e.g. "
            f"{examples}), run a number of processes that divides {total} "
            f"({_divisors(total)}), or set SOLVER.REFERENCE_WORLD_SIZE to the GPU count the "
            "config was written for, so that its images per GPU are kept and the total batch, "
            "lr and schedule are rescaled.")


# ------------------------------------------------------------------------------------------------
# Model
# ------------------------------------------------------------------------------------------------
def check_model_builds(cfg, config_file: str = "") -> Optional[Dict[str, Tuple[int, ...]]]:
    """Build the model on the meta device; return its state-dict shapes.

    Unknown norm names and GN divisibility errors are re-raised with the config's norm keys.
    Any other failure of the meta build returns None (the real build will report it)."""
    from detectron2.modeling import build_model

    from d2_norms.layers import GroupNormDivisibilityError, UnknownNormError

    meta_cfg = cfg.clone()
    meta_cfg.defrost()
    meta_cfg.MODEL.DEVICE = "meta"
    try:
        with torch.device("meta"):
            model = build_model(meta_cfg)
    except (UnknownNormError, GroupNormDivisibilityError) as e:
        where = f" from {config_file}" if config_file else ""
        raise type(e)(f"{e}\n(building {cfg.MODEL.META_ARCHITECTURE}{where}; normalizer keys: "
                      f"{', '.join(norm_settings(cfg))})") from None
    except Exception as e:  # not an input error we know: leave it to the real build
        logger.debug("meta-device build failed (%s: %s); skipping the early model check",
                     type(e).__name__, e)
        return None
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def add_model_context(error: Exception, cfg, config_file: str = "") -> Exception:
    """The same norm error with the config keys appended (for errors of the real build)."""
    where = f" from {config_file}" if config_file else ""
    return type(error)(f"{error}\n(building {cfg.MODEL.META_ARCHITECTURE}{where}; normalizer "
                       f"keys: {', '.join(norm_settings(cfg))})")


# ------------------------------------------------------------------------------------------------
# Weights
# ------------------------------------------------------------------------------------------------
def _strip_module_prefix(state: Mapping[str, Any]) -> Dict[str, Any]:
    keys = list(state)
    if keys and all(k.startswith("module.") for k in keys):
        return {k[len("module."):]: v for k, v in state.items()}
    return dict(state)


def weights_problems(model_shapes: Mapping[str, Tuple[int, ...]], checkpoint_model: Mapping
                     ) -> Dict[str, list]:
    """missing / unexpected / shape-mismatched keys between a model and a checkpoint state."""
    ckpt = _strip_module_prefix(checkpoint_model)
    missing = [k for k in model_shapes if k not in ckpt
               and k.rpartition(".")[2] not in _IGNORED_MISSING and _IGNORED_FRAGMENT not in k]
    unexpected = [k for k in ckpt if k not in model_shapes and _IGNORED_FRAGMENT not in k]
    shapes = []
    for k, shape in model_shapes.items():
        if k in ckpt and hasattr(ckpt[k], "shape") and tuple(ckpt[k].shape) != tuple(shape):
            shapes.append((k, tuple(ckpt[k].shape), tuple(shape)))
    return {"missing": missing, "unexpected": unexpected, "shapes": shapes}


def _show(keys: List[str], n: int = 8) -> str:
    shown = ", ".join(keys[:n])
    return shown + (f", ... ({len(keys)} in all)" if len(keys) > n else "")


_COMPARED_KEYS = ("MODEL.META_ARCHITECTURE", "MODEL.BACKBONE.NAME", "MODEL.RESNETS.DEPTH",
                  "MODEL.RESNETS.NORM", "MODEL.FPN.NORM", "MODEL.FPN.OUT_CHANNELS",
                  "MODEL.RETINANET.NORM", "MODEL.RETINANET.NUM_CLASSES",
                  "MODEL.ROI_HEADS.NUM_CLASSES", "MODEL.ROI_BOX_HEAD.NAME",
                  "MODEL.ROI_BOX_HEAD.NORM", "MODEL.ROI_MASK_HEAD.NORM", "MODEL.MASK_ON")


def _lookup(data, dotted):
    node = data
    for part in dotted.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return None
        node = node[part]
    return node


def _config_hint(cfg, weights_path: str) -> str:
    """Compare with the config.yaml that training wrote next to the weights, if any."""
    run_config = os.path.join(os.path.dirname(os.path.abspath(weights_path)), "config.yaml")
    if not os.path.isfile(run_config):
        return ("Evaluate with the config the weights were trained with (training writes it as "
                "config.yaml in its OUTPUT_DIR).")
    try:
        with open(run_config) as f:
            theirs = yaml.safe_load(f) or {}
    except (OSError, yaml.YAMLError):
        return f"Evaluate with the config the weights were trained with, e.g. {run_config}."
    diffs = []
    for key in _COMPARED_KEYS:
        mine, other = _lookup(cfg, key), _lookup(theirs, key)
        if other is not None and mine != other and str(mine) != str(other):
            diffs.append(f"{key}: {other!r} there, {mine!r} here")
    text = (f"The weights were trained with {run_config}"
            + (" (" + "; ".join(diffs) + ")" if diffs else "")
            + f": pass --config-file {run_config}")
    return text + "."


def mismatch_message(problems: Mapping[str, list], cfg, weights_path: str, action: str,
                     config_file: str = "", override: str = "") -> str:
    built = f"the model built from {config_file}" if config_file else "the model built"
    lines = [f"refusing to {action}: the weights in {weights_path} do not match {built} "
             f"({cfg.MODEL.META_ARCHITECTURE}, {', '.join(norm_settings(cfg))})."]
    if problems["missing"]:
        lines.append(f"  {len(problems['missing'])} model entries are not in the checkpoint "
                     f"(they would stay randomly initialised): {_show(problems['missing'])}")
    if problems["unexpected"]:
        lines.append(f"  {len(problems['unexpected'])} checkpoint entries have no place in the "
                     f"model: {_show(problems['unexpected'])}")
    if problems["shapes"]:
        shown = [f"{k} {a} in the checkpoint vs {b} in the model"
                 for k, a, b in problems["shapes"][:5]]
        lines.append(f"  {len(problems['shapes'])} entries have other shapes: "
                     + "; ".join(shown) + (" ..." if len(problems["shapes"]) > 5 else ""))
    lines.append(_config_hint(cfg, weights_path))
    if override:
        lines.append(override)
    return "\n".join(lines)


def has_problems(problems: Mapping[str, list]) -> bool:
    return any(problems[k] for k in ("missing", "unexpected", "shapes"))


class _CheckpointReader(DetectionCheckpointer):
    """Reads a checkpoint through detectron2's public ``load`` (its URL / ``.pkl`` / Caffe2 name
    handling) without loading it into a model: ``_load_model`` is the checkpointer's documented
    extension hook, here it keeps the parsed dict untouched."""

    def _load_model(self, checkpoint):
        return None


def read_checkpoint(path: str) -> Dict[str, Any]:
    """A checkpoint file as detectron2 reads it (``.pth``, detectron2/Caffe2 ``.pkl``).

    Raises WeightsMismatchError for a file that does not exist or cannot be read (truncated,
    not a checkpoint), naming the file and what to do."""
    reader = _CheckpointReader(torch.nn.Module(), save_to_disk=False)
    try:
        local = reader.path_manager.get_local_path(path)
    except Exception as e:  # URL that cannot be fetched, unknown scheme
        raise WeightsMismatchError(f"weights file {path} cannot be fetched ({type(e).__name__}: "
                                   f"{e}); download it and set MODEL.WEIGHTS to the local file"
                                   ) from None
    if not os.path.isfile(local):
        raise WeightsMismatchError(f"weights file {path} does not exist (MODEL.WEIGHTS, or the "
                                   "checkpoint last_checkpoint names)")
    try:
        checkpoint = reader.load(path, checkpointables=[])
    except Exception as e:  # truncated zip, pickle garbage, a file of another kind
        raise WeightsMismatchError(
            f"weights file {path} cannot be read as a checkpoint ({type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else ''}). It may be incomplete (an interrupted "
            "copy or download) or not a checkpoint (.pth saved by torch.save, or a detectron2 / "
            "Caffe2 .pkl); copy it again or point MODEL.WEIGHTS at another file.") from None
    if not isinstance(checkpoint, dict):
        raise WeightsMismatchError(f"weights file {path} holds a {type(checkpoint).__name__}, "
                                   "not a checkpoint dict (a state dict under 'model')")
    return checkpoint


def check_weights_file(cfg, path: str, model_shapes, *, action: str, config_file: str = "",
                       allow_partial: bool = False, override: str = "",
                       allow_norm_mismatch: bool = False) -> Dict[str, Any]:
    """Read ``path`` and raise WeightsMismatchError if it cannot be read, was made with other
    normalizers than ``cfg`` builds (unless ``allow_norm_mismatch``), or does not fit
    ``model_shapes`` (unless ``allow_partial``, then only log; ``model_shapes`` None: no shape
    check, as for initialisation weights). Returns the loaded checkpoint."""
    from d2_norms.config_checks import weights_norm_problem

    checkpoint = read_checkpoint(path)
    refusals = []
    norm_problem = weights_norm_problem(cfg, checkpoint, path,
                                        "--allow-norm-mismatch uses them anyway")
    if norm_problem is not None:
        if allow_norm_mismatch:
            logger.warning("%s\n(continuing: --allow-norm-mismatch)", norm_problem)
        else:
            refusals.append(f"refusing to {action} these weights: {norm_problem}")
    if model_shapes is not None and not checkpoint.get("matching_heuristics", False):
        state = checkpoint.get("model", checkpoint)
        problems = weights_problems(model_shapes, state)
        if has_problems(problems):
            message = mismatch_message(problems, cfg, path, action, config_file, override)
            if allow_partial:
                logger.warning("%s\n(continuing: partial weights were allowed)", message)
            else:
                refusals.append(message)
    elif model_shapes is not None:
        logger.warning("%s is a Caffe2/pycls model-zoo file loaded by name heuristics; its keys "
                       "are not checked", path)
    if refusals:
        raise WeightsMismatchError("\n".join(refusals))
    return checkpoint


def eval_weights_path(cfg, resume: bool) -> str:
    """What ``--eval-only`` evaluates: OUTPUT_DIR's last checkpoint with ``--resume`` (if there
    is one), else MODEL.WEIGHTS (detectron2's semantics)."""
    if resume:
        from .checkpoint import AtomicCheckpointer

        ckpt = AtomicCheckpointer(torch.nn.Module(), cfg.OUTPUT_DIR, save_to_disk=False)
        if ckpt.has_checkpoint():
            path = ckpt.get_checkpoint_file()
            if path:
                return path
    return cfg.MODEL.WEIGHTS


def last_checkpoint_path(output_dir: str) -> Optional[str]:
    """The checkpoint ``--resume`` continues from; None if OUTPUT_DIR has no pointer. Raises
    WeightsMismatchError when a pointer exists but no complete checkpoint does."""
    from .checkpoint import POINTER, AtomicCheckpointer

    ckpt = AtomicCheckpointer(torch.nn.Module(), output_dir, save_to_disk=False)
    if not ckpt.has_checkpoint():
        return None
    path = ckpt.get_checkpoint_file()
    if not path:
        raise WeightsMismatchError(
            f"--resume: {os.path.join(output_dir, POINTER)} exists but no complete checkpoint "
            f"is in {output_dir}. Restore the checkpoint files, or remove {POINTER} (or drop "
            "--resume / use another OUTPUT_DIR) to start from MODEL.WEIGHTS.")
    return path
