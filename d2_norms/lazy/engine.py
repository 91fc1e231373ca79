"""``tools/lazyconfig_train_net.py`` on d2_norms' engine, for detectron2-style LazyConfigs.

A detectron2-style LazyConfig has ``model``, ``dataloader`` (``train``, ``test``, optional
``evaluator``), ``optimizer``, ``lr_multiplier`` and ``train`` nodes: d2_norms' own
(``configs/lazy/``), detectron2's (``configs/new_baselines``, ``configs/common``) or a user's.
This module runs them with d2_norms' guarantees: the same preflight (every bad input found
before anything is written, one message, exit 2), launch (CPU + gloo processes, torchrun),
trainer (atomic checkpoints, bitwise resume with a resumable data order, non-finite-loss stop),
``results.json`` / ``run_status.json``.

The engine's bookkeeping reads a yacs description of the LazyConfig (:func:`lazy_settings`:
output dir, lengths, periods, batch, datasets, and the normalizer of each part read from the
model graph), written to the run directory as ``settings.yaml`` next to the LazyConfig's
``config.yaml``; model, optimizer, lr multiplier, loaders and evaluator are the config's own
nodes, instantiated as detectron2's ``tools/lazyconfig_train_net.py`` does.
"""
import logging
import os
import tempfile
from typing import Dict, List, Optional, Tuple

from detectron2.config import LazyConfig, instantiate

from d2_norms.engine.defaults import YacsRun, resolve_device
from d2_norms.engine.errors import (ConfigKeyError, LazyConfigError, flatten_keys,
                                    suggest_keys, unknown_key_message)
from d2_norms.engine.trainer import Trainer
from d2_norms.evaluation.run_files import LAZY_SETTINGS_FILE

logger = logging.getLogger("d2_norms.lazy")
SETTINGS_FILE = LAZY_SETTINGS_FILE
REQUIRED_NODES = ("model", "dataloader", "optimizer", "lr_multiplier", "train")

#: model graph node -> (yacs norm key it stands for, the node's norm argument)
_NORM_NODES = (
    ("backbone.bottom_up", "MODEL.RESNETS.NORM", "norm"),
    ("backbone.bottom_up.stages", "MODEL.RESNETS.NORM", "norm"),
    ("backbone", "MODEL.FPN.NORM", "norm"),
    ("head", "MODEL.RETINANET.NORM", "norm"),
    ("proposal_generator.head", "MODEL.RPN.NORM", "norm"),
    ("roi_heads.box_head", "MODEL.ROI_BOX_HEAD.NORM", "conv_norm"),
    ("roi_heads.mask_head", "MODEL.ROI_MASK_HEAD.NORM", "conv_norm"),
)
#: d2_norms' components (a stock detectron2 node can build only detectron2's norm names)
_D2N_TARGETS = {"d2n_resnet", "NormFPN", "NormLastLevelP6P7", "D2NormsRetinaNetHead",
                "D2NormsRPNHead", "D2NormsConvFCHead", "D2NormsMaskHead"}


# ------------------------------------------------------------------------------------------------
# Loading
# ------------------------------------------------------------------------------------------------
def check_override_keys(lazy, overrides: List[str]) -> None:
    """Every ``key=value`` must name a key the LazyConfig has (detectron2's apply_overrides
    would silently create a new one; ``+key=value`` adds one on purpose). Every unknown key
    in one ConfigKeyError, with close matches."""
    from omegaconf import OmegaConf

    known = flatten_keys(OmegaConf.to_container(lazy, resolve=False))
    problems = []
    for item in overrides:
        if "=" not in item:
            hint = ""
            if item.isupper() or "." in item and item.split(".")[0].isupper():
                hint = (" (yacs-style KEY VALUE pairs are for tools/train_net.py; a LazyConfig "
                        "takes key=value with its own node names, e.g. recipe.norm=GN)")
            raise LazyConfigError(f"a LazyConfig override must be key=value; got {item!r}{hint}")
        key = item.split("=", 1)[0].strip()
        if key.startswith("+"):
            continue
        key = key.lstrip("~")
        if key in known:
            continue
        message = unknown_key_message(key, known, "the command-line overrides")
        if not suggest_keys(key, known) and key.split(".")[0].isupper():
            message += " LazyConfig keys are the config's node names (lower case)."
        problems.append(message)
    if problems:
        raise ConfigKeyError("\n".join(problems) + " (add a new key on purpose with "
                             "+key=value)")


def load_lazy_config(config_file: str, overrides: List[str]):
    """The LazyConfig of ``config_file`` with checked ``key=value`` overrides applied."""
    if not config_file:
        raise LazyConfigError("--config-file is required (a LazyConfig .py, or a run's "
                              "config.yaml)")
    if not os.path.isfile(config_file):
        raise LazyConfigError(f"config file {config_file} does not exist (relative paths are "
                              f"taken from the working directory {os.getcwd()})")
    from . import recipe as _recipe  # noqa: F401  (the d2n_recipe resolver, for config.yaml)

    try:
        lazy = LazyConfig.load(config_file)
    except Exception as e:  # syntax errors, failed imports in the config file
        raise LazyConfigError(f"cannot load the LazyConfig {config_file}: "
                              f"{type(e).__name__}: {e}") from None
    missing = [k for k in REQUIRED_NODES if k not in lazy]
    if "dataloader" in lazy:
        missing += [f"dataloader.{k}" for k in ("train", "test") if k not in lazy.dataloader]
    if missing:
        raise LazyConfigError(
            f"{config_file} has no {', '.join(missing)} node(s): the LazyConfig trainers run "
            "detectron2-style configs with model, dataloader (train, test), optimizer, "
            "lr_multiplier and train nodes, as detectron2's configs/new_baselines and "
            "d2_norms' configs/lazy/")
    overrides = list(overrides or [])
    check_override_keys(lazy, overrides)
    try:
        lazy = LazyConfig.apply_overrides(lazy, overrides)
    except (KeyError, ValueError) as e:
        raise LazyConfigError(f"cannot apply the overrides {overrides}: {e}") from None
    except Exception as e:  # hydra's parser errors
        raise LazyConfigError(f"cannot parse the overrides {overrides}: {e}") from None
    return lazy


def process_count(args) -> int:
    """The number of training processes this run has (or will have)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    if os.environ.get("WORLD_SIZE"):
        return int(os.environ["WORLD_SIZE"])
    return int(getattr(args, "num_gpus", None) or 1) * int(getattr(args, "num_machines", None)
                                                          or 1)


def keep_images_per_gpu(lazy, world_size: int) -> None:
    """A recipe config's ``recipe.num_gpus`` set to the process count, so that every process
    gets ``recipe.ims_per_gpu`` images and the schedule follows the papers' linear rule at the
    new total batch (what the yacs cells' REFERENCE_WORLD_SIZE auto-scaling does)."""
    recipe = lazy.get("recipe") if hasattr(lazy, "get") else None
    if recipe is None or "num_gpus" not in recipe:
        return
    if int(recipe.num_gpus) != int(world_size):
        logger.info("recipe.num_gpus=%s -> %d (the process count): %s image(s) per process, "
                    "total batch and schedule rescaled", recipe.num_gpus, world_size,
                    recipe.get("ims_per_gpu"))
        recipe.num_gpus = int(world_size)


def _resolved(node):
    """A node with its interpolations resolved, as plain data (LazyCall targets kept)."""
    from omegaconf import DictConfig, ListConfig, OmegaConf

    if isinstance(node, (DictConfig, ListConfig)):
        return OmegaConf.to_container(node, resolve=True)
    return node


def _target_name(node) -> str:
    target = node.get("_target_") if isinstance(node, dict) else None
    if target is None:
        return ""
    if isinstance(target, str):
        return target.rpartition(".")[2]
    return getattr(target, "__name__", str(target))


def _node(graph: dict, dotted: str):
    for part in dotted.split("."):
        if not isinstance(graph, dict) or part not in graph:
            return None
        graph = graph[part]
    return graph if isinstance(graph, dict) else None


def model_norms(model: dict) -> List[Tuple[str, str, str, str]]:
    """(node path, target name, yacs key, norm) of every norm-bearing node of a resolved model
    graph whose norm is a name (a callable norm is the user's own)."""
    out = []
    for path, key, arg in _NORM_NODES:
        node = _node(model, path)
        if node is None or arg not in node or not isinstance(node[arg], str):
            continue
        out.append((f"model.{path}.{arg}", _target_name(node), key, node[arg]))
    return out


def lazy_settings(lazy):
    """The yacs description of a detectron2-style LazyConfig that the engine's bookkeeping
    reads (lengths, periods, batch, datasets, device, the normalizer of each part)."""
    from detectron2.config import get_cfg

    from d2_norms.config import add_d2_norms_config

    cfg = add_d2_norms_config(get_cfg())
    try:
        train = _resolved(lazy.train)
        loader = _resolved(lazy.dataloader.train)
        test = _resolved(lazy.dataloader.test)
        model = _resolved(lazy.model)
    except Exception as e:
        if _is_user_error(e):
            raise
        if _is_user_error(getattr(e, "__cause__", None) or e):  # raised inside a resolver
            raise e.__cause__ from None
        raise LazyConfigError(f"cannot resolve the LazyConfig's values: {type(e).__name__}: "
                              f"{e}") from None
    cfg.OUTPUT_DIR = str(train.get("output_dir", "./output"))
    cfg.MODEL.WEIGHTS = str(train.get("init_checkpoint") or "")
    cfg.SOLVER.MAX_ITER = int(train["max_iter"])
    cfg.SOLVER.CHECKPOINT_PERIOD = int((train.get("checkpointer") or {}).get("period", 5000))
    cfg.TEST.EVAL_PERIOD = int(train.get("eval_period", 0) or 0)
    cfg.SEED = int(train.get("seed", -1) if train.get("seed") is not None else -1)
    cfg.SOLVER.AMP.ENABLED = bool((train.get("amp") or {}).get("enabled", False))
    cfg.MODEL.DEVICE = str(train.get("device", "cuda"))
    precise = train.get("precise_bn") or {}
    cfg.TEST.PRECISE_BN.ENABLED = bool(precise.get("enabled", False))
    cfg.TEST.PRECISE_BN.NUM_ITER = int(precise.get("num_iter", 200))
    cfg.SOLVER.IMS_PER_BATCH = int(loader.get("total_batch_size", 0) or 0)
    cfg.SOLVER.REFERENCE_WORLD_SIZE = 0  # the recipe node keeps the per-GPU images instead
    cfg.DATALOADER.NUM_WORKERS = int(loader.get("num_workers", 0) or 0)
    cfg.DATALOADER.ASPECT_RATIO_GROUPING = bool(loader.get("aspect_ratio_grouping", True))
    dataset = loader.get("dataset") or {}
    cfg.DATALOADER.FILTER_EMPTY_ANNOTATIONS = bool(dataset.get("filter_empty", True))
    cfg.DATASETS.TRAIN = _names(dataset.get("names"))
    cfg.DATASETS.TEST = _names((test.get("dataset") or {}).get("names"))
    _describe_model(cfg, model)
    return cfg


def _names(names) -> tuple:
    if names is None:
        return ()
    return (names,) if isinstance(names, str) else tuple(names)


def _describe_model(cfg, model: dict) -> None:
    """The model graph in yacs keys: architecture, classes, input normalization, and the norm
    of each part with the component reading it (d2_norms' or detectron2's)."""
    meta = _target_name(model)
    retinanet = "RetinaNet" in meta
    cfg.MODEL.META_ARCHITECTURE = meta or cfg.MODEL.META_ARCHITECTURE
    for key in ("pixel_mean", "pixel_std"):
        if key in model:
            setattr(cfg.MODEL, key.upper(), [float(v) for v in model[key]])
    cfg.INPUT.FORMAT = str(model.get("input_format", cfg.INPUT.FORMAT))
    if retinanet:
        cfg.MODEL.RETINANET.NUM_CLASSES = int(model.get("num_classes", 80))
    roi = model.get("roi_heads") or {}
    if isinstance(roi, dict) and "num_classes" in roi:
        cfg.MODEL.ROI_HEADS.NUM_CLASSES = int(roi["num_classes"])
    cfg.MODEL.MASK_ON = isinstance(roi, dict) and isinstance(roi.get("mask_head"), dict)
    bottom_up = _node(model, "backbone.bottom_up") or {}
    d2n_backbone = _target_name(bottom_up) == "d2n_resnet"
    if d2n_backbone:
        cfg.MODEL.BACKBONE.NAME = ("build_d2n_retinanet_resnet_fpn_backbone" if retinanet
                                   else "build_d2n_resnet_fpn_backbone")
        cfg.MODEL.RESNETS.DEPTH = int(bottom_up.get("depth", 50))
    else:
        cfg.MODEL.BACKBONE.NAME = ("build_retinanet_resnet_fpn_backbone" if retinanet
                                   else "build_resnet_fpn_backbone")
        stages = bottom_up.get("stages") or {}
        if isinstance(stages, dict) and "depth" in stages:
            cfg.MODEL.RESNETS.DEPTH = int(stages["depth"])
    for key in ("MODEL.RESNETS.NORM", "MODEL.FPN.NORM", "MODEL.RETINANET.NORM",
                "MODEL.RPN.NORM", "MODEL.ROI_BOX_HEAD.NORM", "MODEL.ROI_MASK_HEAD.NORM"):
        _set(cfg, key, "")
    for _path, target, key, norm in model_norms(model):
        _set(cfg, key, norm)
    head = model.get("head") or {}
    if _target_name(head) == "D2NormsRetinaNetHead":
        cfg.MODEL.RETINANET.NORM_PER_LEVEL = bool(head.get("norm_per_level", False))
    rpn_head = _node(model, "proposal_generator.head") or {}
    if _target_name(rpn_head) == "D2NormsRPNHead":
        cfg.MODEL.RPN.HEAD_NAME = "D2NormsRPNHead"
    box = _node(model, "roi_heads.box_head") or {}
    if _target_name(box) == "D2NormsConvFCHead":
        cfg.MODEL.ROI_BOX_HEAD.NAME = "D2NormsConvFCHead"
    if box:
        cfg.MODEL.ROI_BOX_HEAD.NUM_CONV = len(box.get("conv_dims") or [])
        cfg.MODEL.ROI_BOX_HEAD.NUM_FC = len(box.get("fc_dims") or [])
    mask = _node(model, "roi_heads.mask_head") or {}
    if _target_name(mask) == "D2NormsMaskHead":
        cfg.MODEL.ROI_MASK_HEAD.NAME = "D2NormsMaskHead"


def _set(cfg, dotted: str, value) -> None:
    *parents, leaf = dotted.split(".")
    node = cfg
    for p in parents:
        node = node[p]
    node[leaf] = value


# ------------------------------------------------------------------------------------------------
# Input checks (preflight)
# ------------------------------------------------------------------------------------------------
def lazy_norm_problems(lazy) -> List[str]:
    """Every normalizer problem of the model graph, each naming the node to change: unknown
    names (with close ones), a detectron2 component given a name only d2_norms' components
    build, NF (Scaled WS) parts with inputs far from unit variance."""
    import difflib

    from d2_norms.config_checks import nf_input_problem
    from d2_norms.layers import (UnknownNormError, detectron2_norm_names, get_norm_spec,
                                 norm_conv_kind, registered_norms)

    model = _resolved(lazy.model)
    problems, scaled_ws = [], False
    stock_names = set(detectron2_norm_names())
    all_names = sorted(set(registered_norms()) | stock_names)
    for path, target, _key, norm in model_norms(model):
        if not norm:
            continue
        try:
            get_norm_spec(norm)
            ours = True
        except UnknownNormError:
            ours = False
        if not ours and norm not in stock_names:
            close = ([n for n in all_names if n.lower() == norm.lower()]
                     or difflib.get_close_matches(norm, all_names, n=3, cutoff=0.5))
            problems.append(f"{path}={norm!r}: unknown normalizer"
                            + (f" (did you mean {' or '.join(map(repr, close))}?)" if close
                               else f"; registered: {', '.join(all_names)}"))
            continue
        if target in _D2N_TARGETS:
            scaled_ws = scaled_ws or (ours and norm_conv_kind(norm) == "scaled_ws")
        elif norm not in stock_names:
            problems.append(
                f"{path}={norm!r}: detectron2's {target or 'component'} builds only "
                f"detectron2's norms ({', '.join(sorted(stock_names))}); {norm!r} needs "
                "d2_norms' components: d2_norms_model(model, norm) (d2_norms.lazy.components) "
                "rebuilds a detectron2 model graph from them, or start from "
                "configs/lazy/common/models")
    if scaled_ws and "pixel_std" in model:
        problem = nf_input_problem(model["pixel_std"], "model.pixel_std", "model.pixel_std")
        if problem:
            problems.append(problem)
    return problems


def check_model_builds_lazy(lazy) -> Optional[Dict[str, tuple]]:
    """Instantiate the model on the meta device: norm errors raise (as the real build would),
    anything else is left to the real build. Returns the state-dict shapes."""
    import torch

    from d2_norms.layers import GroupNormDivisibilityError, UnknownNormError

    try:
        with torch.device("meta"):
            model = instantiate(lazy.model)
    except (UnknownNormError, GroupNormDivisibilityError, LazyConfigError):
        raise
    except Exception as e:
        logger.debug("meta-device build failed (%s: %s); skipping the early model check",
                     type(e).__name__, e)
        return None
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def _is_user_error(e: BaseException) -> bool:
    from d2_norms.engine.errors import user_error_types

    return isinstance(e, user_error_types())


def check_saveable(lazy, cfg) -> None:
    """``LazyConfig.save`` then ``load`` must give the same settings. A config holding objects
    YAML cannot represent (a lambda, as detectron2's own SyncBN baselines) is saved by
    detectron2 as a pickle next to config.yaml: allowed, with a warning."""
    with tempfile.TemporaryDirectory(prefix="d2n-lazy-check-") as tmp:
        path = os.path.join(tmp, "config.yaml")
        detectron2_logger = logging.getLogger("detectron2.config.lazy")
        level = detectron2_logger.level
        detectron2_logger.setLevel(logging.CRITICAL)  # its own "could not save" + pickle
        try:
            LazyConfig.save(lazy, path)
        finally:
            detectron2_logger.setLevel(level)
        lost = None
        if os.path.isfile(path) and not os.path.exists(path + ".pkl"):
            from omegaconf import OmegaConf

            saved = LazyConfig.load(path)
            lost = _unlocatable_targets(OmegaConf.to_container(saved, resolve=False))
        if lost is None or lost:
            logger.warning("this LazyConfig holds objects YAML cannot represent (a lambda, a "
                           "closure%s): the run's config.yaml will not reproduce it (detectron2 "
                           "saves a pickle, config.yaml.pkl, where it can)",
                           f": {', '.join(lost)}" if lost else "")
            return
        try:
            again = lazy_settings(saved)
        except Exception as e:
            problem = f"loading the saved file fails ({type(e).__name__}: {e})"
        else:
            problem = None if again.dump() == cfg.dump() else \
                "the saved and re-loaded config builds other settings"
        if problem:
            raise LazyConfigError(
                f"this LazyConfig cannot be saved as the run's config.yaml: {problem}. Use "
                "registered functions (module-level, importable) and plain values in "
                "LazyCall(...) nodes, as configs/lazy/ does.")


def _unlocatable_targets(node, prefix: str = "") -> List[str]:
    """Paths of ``_target_`` strings that cannot be imported back (a lambda saved by name)."""
    from detectron2.utils.registry import locate

    out = []
    if isinstance(node, dict):
        target = node.get("_target_")
        if isinstance(target, str):
            try:
                locate(target)
            except Exception:
                out.append(f"{prefix.rstrip('.') or 'root'} ({target})")
        for key, value in node.items():
            out += _unlocatable_targets(value, f"{prefix}{key}.")
    elif isinstance(node, list):
        for i, value in enumerate(node):
            out += _unlocatable_targets(value, f"{prefix}{i}.")
    return out


# ------------------------------------------------------------------------------------------------
# The engine hooks
# ------------------------------------------------------------------------------------------------
class LazyRun(YacsRun):
    """``d2_norms.engine.defaults`` hooks for a detectron2-style LazyConfig
    (``--config-file x.py`` plus ``key=value`` overrides)."""

    def load(self, args) -> Tuple[object, object]:
        lazy = load_lazy_config(args.config_file, list(args.opts))
        if "recipe" in lazy:  # every recipe problem at once, before values are read from it
            from .recipe import check_recipe_node

            check_recipe_node(lazy.recipe)
        keep_images_per_gpu(lazy, process_count(args))
        cfg = lazy_settings(lazy)
        resolve_device(cfg)
        if cfg.MODEL.DEVICE != str(lazy.train.get("device", cfg.MODEL.DEVICE)):
            lazy.train.device = cfg.MODEL.DEVICE
        return lazy, cfg

    def setup_cfg(self, args, *, log: bool = True):
        from detectron2.engine import default_setup
        from detectron2.utils import comm
        from detectron2.utils.logger import setup_logger

        lazy, cfg = self.load(args)
        cfg.freeze()
        if log:
            default_setup(lazy, args)  # config.yaml (LazyConfig.save), logger, seeds
            setup_logger(cfg.OUTPUT_DIR, distributed_rank=comm.get_rank(), name="d2_norms",
                         abbrev_name="d2n")
            if comm.is_main_process():
                from d2_norms.fileio import atomic_write_text

                atomic_write_text(os.path.join(cfg.OUTPUT_DIR, SETTINGS_FILE), cfg.dump())
        return cfg

    def extra_checks(self, args, cfg) -> None:
        lazy, _ = self.load(args)
        check_saveable(lazy, cfg)

    def model_checks(self, args, cfg, problems):
        lazy, _ = self.load(args)
        if "recipe" in lazy:
            from .recipe import check_recipe_node

            with problems.check():
                check_recipe_node(lazy.recipe)
            if problems:
                return None
        norms = lazy_norm_problems(lazy)
        if norms:
            problems.extend(norms)
            return None
        shapes = None
        with problems.check():
            shapes = check_model_builds_lazy(lazy)
        return shapes

    def build_model(self, cfg, args):
        lazy, _ = self.load(args)
        return trainer_class(lazy).build_model(cfg)

    def test(self, cfg, model, args):
        lazy, _ = self.load(args)
        return trainer_class(lazy).test(cfg, model)

    def trainer(self, cfg, args):
        lazy, _ = self.load(args)
        return trainer_class(lazy)(cfg)


def trainer_class(lazy):
    """:class:`LazyTrainer` bound to one LazyConfig (its class methods build the loaders and
    evaluators that ``Trainer.test`` asks for)."""
    return type("LazyTrainer", (LazyTrainer,), {"lazy": lazy})


class LazyTrainer(Trainer):
    """d2_norms' Trainer with the LazyConfig's model, optimizer, lr multiplier, loaders and
    evaluator; checkpoints, resume, hooks and results as for yacs configs."""

    lazy = None

    @classmethod
    def build_model(cls, cfg):
        from d2_norms.layers import GroupNormDivisibilityError, UnknownNormError

        try:
            model = instantiate(cls.lazy.model)
        except (UnknownNormError, GroupNormDivisibilityError) as e:
            raise type(e)(f"{e}\n(building the model node of the LazyConfig)") from None
        model.to(cfg.MODEL.DEVICE)
        logger.info("Model:\n%s", model)
        return model

    @classmethod
    def build_optimizer(cls, cfg, model):
        spec = _resolved(cls.lazy.optimizer)
        params = spec.get("params")
        if isinstance(params, dict) and "_target_" in params:
            params["model"] = model  # detectron2's convention: optimizer.params.model
        optimizer = instantiate(spec)
        _warn_missing_agc(model, optimizer)
        return optimizer

    @classmethod
    def build_lr_scheduler(cls, cfg, optimizer):
        from detectron2.solver.lr_scheduler import LRMultiplier

        return LRMultiplier(optimizer, multiplier=instantiate(_resolved(cls.lazy.lr_multiplier)),
                            max_iter=cfg.SOLVER.MAX_ITER)

    @classmethod
    def build_train_loader(cls, cfg):
        """detectron2's train loader node with its dataset and mapper, in d2_norms' resumable
        order (a resumed run sees the samples an uninterrupted one would); another loader node
        is instantiated as it is (with a warning: no exact resume)."""
        from detectron2.utils import comm

        from d2_norms.data import CheckedMapper, SafeDatasetMapper, check_datasets

        from d2_norms.engine.train_loader import build_resumable_train_loader

        spec = _resolved(cls.lazy.dataloader.train)
        standard = (_target_name(spec) == "build_detection_train_loader"
                    and _target_name(spec.get("dataset") or {}) == "get_detection_dataset_dicts"
                    and isinstance(spec.get("mapper"), dict)
                    and set(spec) <= {"_target_", "dataset", "mapper", "total_batch_size",
                                      "num_workers", "aspect_ratio_grouping"})
        if not standard:
            logger.warning("dataloader.train is not detectron2's build_detection_train_loader "
                           "over get_detection_dataset_dicts: using it as it is; a resumed run "
                           "will not see the same samples as an uninterrupted one")
            return instantiate(spec)
        check_datasets(cfg, deep=comm.is_main_process())
        mapper = instantiate(spec["mapper"])
        if not isinstance(mapper, SafeDatasetMapper):
            mapper = CheckedMapper(mapper)  # a missing / unreadable image names its file
        return build_resumable_train_loader(cfg, mapper)

    @classmethod
    def build_test_loader(cls, cfg, dataset_name):
        spec = _resolved(cls.lazy.dataloader.test)
        spec.setdefault("dataset", {})["names"] = dataset_name
        return instantiate(spec)

    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        if "evaluator" not in cls.lazy.dataloader:
            return super().build_evaluator(cfg, dataset_name, output_folder)
        spec = _resolved(cls.lazy.dataloader.evaluator)
        if "dataset_name" in spec:
            spec["dataset_name"] = dataset_name
        return instantiate(spec)


def _warn_missing_agc(model, optimizer) -> None:
    """NF (Scaled WS) models train with AGC in the NF recipe: say so when the optimizer has
    none (e.g. detectron2's common/optim.SGD)."""
    from d2_norms.layers.weight_std import ScaledStdConv2d

    if getattr(optimizer, "agc_clipping", None) is not None:
        return
    if any(isinstance(m, ScaledStdConv2d) for m in model.modules()):
        logger.warning("the model has Scaled WS (NF) convs but the optimizer applies no adaptive "
                       "gradient clipping, which the NF recipe trains with (NFNets sec. 4.1): "
                       "optimizer = L(SGDWithAGC)(params=L(d2_norms_optimizer_params)("
                       "weight_decay_norm=0.0, agc=True), ..., clipping=%s) (d2_norms.solver; "
                       "configs/lazy/common/optim.py)", _nf_clipping())


def _nf_clipping() -> float:
    from d2_norms.recipes import NF_AGC_CLIPPING

    return NF_AGC_CLIPPING


def run_cli(argv=None):
    """``tools/lazyconfig_train_net.py``: parse, check the input before anything is written,
    launch (``d2_norms.engine.defaults.run_cli`` with :class:`LazyRun`)."""
    from d2_norms.engine.defaults import run_cli as engine_cli

    engine_cli(argv, run=LazyRun())
