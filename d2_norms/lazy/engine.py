"""``tools/lazyconfig_train_net.py`` on d2_norms' engine: the same preflight, launch (CPU + gloo
processes, torchrun), trainer (atomic checkpoints, bitwise resume, non-finite-loss stop),
evaluator and results files as ``tools/train_net.py``; only the way arguments become settings,
model and optimizer differs (:class:`LazyRun`, plugged into ``d2_norms.engine.defaults``).

A run directory holds ``config.yaml`` (the LazyConfig, ``LazyConfig.save``; train again or
evaluate with ``--config-file RUN/config.yaml``) and ``settings.yaml`` (the yacs settings the
engine ran with, which ``tools/ap_table.py`` reads like a yacs run's config.yaml).
"""
import logging
import os
import tempfile
from typing import List, Tuple

from detectron2.config import LazyConfig, instantiate

from d2_norms.engine.defaults import YacsRun, resolve_device
from d2_norms.engine.errors import (ConfigKeyError, LazyConfigError, suggest_keys,
                                    unknown_key_message)
from d2_norms.engine.trainer import Trainer
from d2_norms.evaluation.run_files import LAZY_SETTINGS_FILE

from . import TRAIN_KEYS

logger = logging.getLogger("d2_norms.lazy")
SETTINGS_FILE = LAZY_SETTINGS_FILE
# Free-form yacs keys (checked against detectron2's + d2_norms' keys when the settings build).
_OPEN_PREFIXES = ("settings.overrides.",)


# ------------------------------------------------------------------------------------------------
# Loading
# ------------------------------------------------------------------------------------------------
def _known_keys(node, prefix: str = "") -> List[str]:
    keys = []
    for name, value in node.items():
        full = f"{prefix}{name}"
        keys.append(full)
        if isinstance(value, dict):
            keys.extend(_known_keys(value, full + "."))
    return keys


def check_override_keys(lazy, overrides: List[str]) -> None:
    """Every ``key=value`` must name a key the LazyConfig has (detectron2's apply_overrides
    would silently create a new one), except under ``settings.overrides`` (yacs keys, checked
    when the settings build). Unknown keys: ConfigKeyError with close matches."""
    from omegaconf import OmegaConf

    known = _known_keys(OmegaConf.to_container(lazy, resolve=False))
    for item in overrides:
        if "=" not in item:
            hint = ""
            if item.isupper() or "." in item and item.split(".")[0].isupper():
                hint = (" (yacs-style KEY VALUE pairs are for tools/train_net.py; here yacs keys "
                        f"go under settings.overrides: settings.overrides.{item}=VALUE)")
            raise LazyConfigError(f"a LazyConfig override must be key=value; got {item!r}{hint}")
        key = item.split("=", 1)[0].strip().lstrip("+~")
        if key in known or any(key.startswith(p) for p in _OPEN_PREFIXES):
            continue
        message = unknown_key_message(key, known, "the command-line overrides")
        if not suggest_keys(key, known) and key.split(".")[0].isupper():
            message += (f" yacs keys are set under settings.overrides, e.g. "
                        f"settings.overrides.{key}=VALUE.")
        raise ConfigKeyError(message)


def load_lazy_config(config_file: str, overrides: List[str]):
    """The LazyConfig of ``config_file`` with checked ``key=value`` overrides applied."""
    if not config_file:
        raise LazyConfigError("--config-file is required (a LazyConfig .py, or a run's "
                              "config.yaml)")
    if not os.path.isfile(config_file):
        raise LazyConfigError(f"config file {config_file} does not exist (relative paths are "
                              f"taken from the working directory {os.getcwd()})")
    try:
        lazy = LazyConfig.load(config_file)
    except Exception as e:  # syntax errors, failed imports in the config file
        raise LazyConfigError(f"cannot load the LazyConfig {config_file}: "
                              f"{type(e).__name__}: {e}") from None
    missing = [k for k in ("settings", "model", "optimizer", "train") if k not in lazy]
    if missing:
        raise LazyConfigError(
            f"{config_file} has no {', '.join(missing)} node(s): d2_norms' lazy trainer runs "
            "configs with recipe / train / settings / model / optimizer nodes, as those in "
            "configs/lazy/ (tools/make_configs.py writes them)")
    overrides = list(overrides or [])
    check_override_keys(lazy, overrides)
    try:
        lazy = LazyConfig.apply_overrides(lazy, overrides)
    except (KeyError, ValueError) as e:
        raise LazyConfigError(f"cannot apply the overrides {overrides}: {e}") from None
    except Exception as e:  # hydra's parser errors
        raise LazyConfigError(f"cannot parse the overrides {overrides}: {e}") from None
    return lazy


def settings_of(lazy):
    """Instantiate the settings node; fill the ``train`` entries left None with what the
    settings hold (so the saved config records the values the run used); fall back to CPU
    when CUDA is absent (as tools/train_net.py)."""
    from omegaconf import OmegaConf

    try:
        cfg = instantiate(lazy.settings)
    except Exception as e:
        if _is_user_error(e):
            raise
        raise LazyConfigError(f"cannot build the settings node: {type(e).__name__}: {e}"
                              ) from None
    resolve_device(cfg)
    for key, yacs_key in TRAIN_KEYS.items():
        value = cfg
        for part in yacs_key.split("."):
            value = value[part]
        OmegaConf.update(lazy, f"train.{key}", value, merge=True)
    return cfg


def _is_user_error(e: BaseException) -> bool:
    from d2_norms.engine.errors import user_error_types

    return isinstance(e, user_error_types())


def check_saveable(lazy, cfg) -> None:
    """``LazyConfig.save`` then ``load`` must give the same settings (a lambda or a closure in
    the config would not survive: the run's config.yaml could not reproduce it)."""
    with tempfile.TemporaryDirectory(prefix="d2n-lazy-check-") as tmp:
        path = os.path.join(tmp, "config.yaml")
        detectron2_logger = logging.getLogger("detectron2.config.lazy")
        level = detectron2_logger.level
        detectron2_logger.setLevel(logging.CRITICAL)  # its own "could not save" + pickle
        try:
            LazyConfig.save(lazy, path)
        finally:
            detectron2_logger.setLevel(level)
        problem = None
        if not os.path.isfile(path) or os.path.exists(path + ".pkl"):
            problem = "it holds objects YAML cannot represent (a lambda, a closure, an object)"
        else:
            try:
                again = settings_of(LazyConfig.load(path))
            except Exception as e:
                problem = f"loading the saved file fails ({type(e).__name__}: {e})"
            else:
                if again.dump() != cfg.dump():
                    problem = "the saved and re-loaded config builds other settings"
        if problem:
            raise LazyConfigError(
                f"this LazyConfig cannot be saved as the run's config.yaml: {problem}. Use "
                "registered functions (module-level, importable) and plain values in "
                "LazyCall(...) nodes, as configs/lazy/ does.")


# ------------------------------------------------------------------------------------------------
# The engine hooks
# ------------------------------------------------------------------------------------------------
def _fill_and_instantiate(node, **given):
    """Instantiate a LazyCall node with some arguments given as objects (the trainer's
    settings, the model) rather than config values; a ``params`` node with a ``model`` entry
    (detectron2's optimizer convention) gets the model too."""
    from detectron2.utils.registry import locate

    target = node._target_
    if isinstance(target, str):
        target = locate(target)
    kwargs = {}
    for key in node:
        if key == "_target_":
            continue
        if key in given:
            kwargs[key] = given[key]
            continue
        child = node[key]
        if key == "params" and "model" in given and hasattr(child, "keys") and "model" in child:
            child.model = given["model"]
        kwargs[key] = instantiate(child)
    return target(**kwargs)


class LazyRun(YacsRun):
    """``d2_norms.engine.defaults`` hooks for a LazyConfig (``--config-file x.py`` plus
    ``key=value`` overrides)."""

    def load(self, args) -> Tuple[object, object]:
        lazy = load_lazy_config(args.config_file, list(args.opts))
        return lazy, settings_of(lazy)

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

    def build_model(self, cfg, args):
        lazy, _ = self.load(args)
        return instantiate(lazy.model)

    def trainer(self, cfg, args):
        lazy, _ = self.load(args)
        return LazyTrainer(cfg, lazy)


class LazyTrainer(Trainer):
    """d2_norms' Trainer with the LazyConfig's model and optimizer nodes; everything else
    (loaders, schedule, hooks, checkpoints, evaluation) from the settings, as for yacs."""

    def __init__(self, cfg, lazy):
        self.lazy = lazy
        super().__init__(cfg)

    def build_model(self, cfg):  # an instance method here: the LazyConfig's model node
        return instantiate(self.lazy.model)

    def build_optimizer(self, cfg, model):
        # cfg: the settings after REFERENCE_WORLD_SIZE auto-scaling (lr, schedule)
        return _fill_and_instantiate(self.lazy.optimizer, cfg=cfg, model=model)


def run_cli(argv=None):
    """``tools/lazyconfig_train_net.py``: parse, check the input before anything is written,
    launch (``d2_norms.engine.defaults.run_cli`` with :class:`LazyRun`)."""
    from d2_norms.engine.defaults import run_cli as engine_cli

    engine_cli(argv, run=LazyRun())
