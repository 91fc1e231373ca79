"""The d2_norms trainer: detectron2's DefaultTrainer made device-agnostic (CPU/gloo or CUDA/NCCL),
resumable exactly after a kill, and guarded against non-finite losses."""
import logging
import math
import weakref
from typing import Dict, List, Mapping, Optional

import numpy as np
import torch
from detectron2.engine import AMPTrainer, DefaultTrainer, SimpleTrainer, TrainerBase, hooks
from detectron2.modeling import build_model
from detectron2.utils import comm
from detectron2.utils.events import get_event_storage
from detectron2.utils.logger import setup_logger
from fvcore.nn.precise_bn import get_bn_modules
from torch.nn.parallel import DistributedDataParallel

from d2_norms.config_checks import norm_record

from .checkpoint import (AtomicCheckpointer, CheckpointHook, gather_rng_states, isolated_rng,
                         non_finite_entries, remove_stale_temp_files, restore_rng_state)
from .errors import (NonFiniteLossError, NonFiniteWeightsError, divergence_remedies,
                     format_values)

logger = logging.getLogger("d2_norms.trainer")
# Optimizer hyper-parameters taken from the config (not the checkpoint) when resuming.
_CONFIG_HPARAMS = ("weight_decay", "momentum", "nesterov", "dampening")


def create_ddp_model(model: torch.nn.Module, **kwargs) -> torch.nn.Module:
    """DDP wrapper for >1 process: ``device_ids`` only for a CUDA model (gloo/CPU takes None)."""
    if comm.get_world_size() == 1:
        return model
    device = next(model.parameters()).device
    kwargs.setdefault("device_ids", [device.index if device.index is not None
                                     else comm.get_local_rank()] if device.type == "cuda" else None)
    return DistributedDataParallel(model, **kwargs)


class _CheckedMetricsMixin:
    """Replaces detectron2's ``write_metrics``: the loss values of every process are gathered
    to every process (not only the main one), so that a NaN/inf loss on any rank stops all
    ranks together, before ``optimizer.step()`` (no process waits forever in the next
    all-reduce). ``describe_failure(iteration, per_rank)`` builds the error message."""

    describe_failure = None
    #: (iteration, {loss: mean over processes}) of the last step whose losses were finite
    last_finite_losses = None

    def run_step(self):
        try:
            super().run_step()
        except FloatingPointError as e:
            if isinstance(e, NonFiniteLossError):
                raise
            # detectron2 checks some outputs itself during the forward pass (RPN: "Predicted
            # boxes or scores contain Inf/NaN"): the same divergence, reported the same way.
            describe = self.describe_failure or _default_failure
            raise NonFiniteLossError(describe(get_event_storage().iter, None, cause=str(e))
                                     ) from e

    def _write_metrics(self, loss_dict: Mapping[str, torch.Tensor], data_time: float,
                       prefix: str = "") -> None:
        values = {k: float(v.detach().cpu().item()) for k, v in loss_dict.items()}
        per_rank: List[Dict[str, float]] = (comm.all_gather(values) if comm.get_world_size() > 1
                                            else [values])
        data_times = (comm.all_gather(data_time) if comm.get_world_size() > 1 else [data_time])
        storage = get_event_storage()
        if any(not math.isfinite(v) for d in per_rank for v in d.values()):
            describe = self.describe_failure or _default_failure
            raise NonFiniteLossError(describe(storage.iter, per_rank))
        means = {k: float(np.mean([d[k] for d in per_rank])) for k in per_rank[0]}
        self.last_finite_losses = (storage.iter, means)
        if comm.is_main_process():
            storage.put_scalar("data_time", float(np.max(data_times)))
            storage.put_scalar(f"{prefix}total_loss", sum(means.values()))
            if len(means) > 1:
                storage.put_scalars(**means)


def _default_failure(iteration, per_rank, cause=None):
    return f"loss became non-finite at iteration {iteration}: {per_rank or cause}"


class CheckedSimpleTrainer(_CheckedMetricsMixin, SimpleTrainer):
    pass


class CheckedAMPTrainer(_CheckedMetricsMixin, AMPTrainer):
    pass


class Trainer(DefaultTrainer):
    """DefaultTrainer with:

    - DDP on CPU (gloo) as well as CUDA; AMP only where it exists (CUDA), with a warning otherwise;
    - SGD without weight decay on every normalizer parameter (d2_norms' layers included) and
      a cosine warm-up option (``d2_norms.solver``);
    - COCO evaluation through ``d2_norms.evaluation``;
    - exact resume after a kill: atomic checkpoints holding the optimizer, scheduler, iteration,
      every process's RNG states and the data seed; a training order that resumes at the right
      sample with the same augmentations (``d2_norms.engine.train_loader``); evaluation that
      does not disturb the training RNG;
    - a non-finite loss stops every process before the weights change, with the iteration, the
      losses and remedies; a checkpoint is never written from non-finite weights;
    - ``train()`` returning the final evaluation results.
    """

    def __init__(self, cfg):  # noqa: D401 -- same construction order as DefaultTrainer
        TrainerBase.__init__(self)
        if not logging.getLogger("detectron2").isEnabledFor(logging.INFO):
            setup_logger()
        cfg = self.auto_scale_workers(cfg, comm.get_world_size())

        model = self.build_model(cfg)
        optimizer = self.build_optimizer(cfg, model)
        if comm.is_main_process():  # any optimizer (a LazyConfig's may be detectron2's own)
            from d2_norms.solver import warn_decayed_normalizer_parameters

            warn_decayed_normalizer_parameters(model, optimizer, logger)
        data_loader = self.build_train_loader(cfg)
        model = create_ddp_model(model, broadcast_buffers=False)

        use_amp = cfg.SOLVER.AMP.ENABLED
        if use_amp and not str(cfg.MODEL.DEVICE).startswith("cuda"):
            logger.warning("SOLVER.AMP.ENABLED is ignored on %s: detectron2's AMPTrainer needs "
                           "CUDA. Training in float32.", cfg.MODEL.DEVICE)
            use_amp = False
        self._trainer = (CheckedAMPTrainer if use_amp else CheckedSimpleTrainer)(
            model, data_loader, optimizer)
        self._trainer.describe_failure = self._describe_non_finite_loss

        self.scheduler = self.build_lr_scheduler(cfg, optimizer)
        # What the config asks for, to re-apply over a resumed optimizer (see resume_or_load).
        self._config_hparams = [{k: g[k] for k in _CONFIG_HPARAMS if k in g}
                                for g in optimizer.param_groups]
        self._config_base_lrs = list(getattr(self.scheduler, "base_lrs", []))
        self.checkpointer = AtomicCheckpointer(model, cfg.OUTPUT_DIR,
                                               trainer=weakref.proxy(self))
        # which normalizer built each part: checked when the weights are loaded into a model
        self.checkpointer.record = norm_record(cfg)
        self.start_iter = 0
        self.max_iter = cfg.SOLVER.MAX_ITER
        self.cfg = cfg
        self._rng_states = None
        if comm.is_main_process():
            remove_stale_temp_files(cfg.OUTPUT_DIR)
        self.register_hooks(self.build_hooks())

    # -- construction -----------------------------------------------------------------------
    @staticmethod
    def auto_scale_workers(cfg, num_workers: int):
        """detectron2's REFERENCE_WORLD_SIZE auto-scaling, after a check whose error says how
        to fix the batch (detectron2 only asserts)."""
        from .preflight import check_batch_split

        check_batch_split(cfg, num_workers)
        return DefaultTrainer.auto_scale_workers(cfg, num_workers)

    @classmethod
    def build_model(cls, cfg):
        from d2_norms.layers import GroupNormDivisibilityError, UnknownNormError

        from .preflight import add_model_context

        try:
            model = build_model(cfg)
        except (UnknownNormError, GroupNormDivisibilityError) as e:
            raise add_model_context(e, cfg) from None
        logging.getLogger(__name__).info("Model:\n%s", model)
        return model

    @classmethod
    def build_train_loader(cls, cfg):
        """A training loader whose order and augmentations resume exactly
        (``d2_norms.engine.train_loader``), with d2_norms' mapper: a missing/unreadable image is an
        error that names the file (in worker processes too). Datasets are checked first."""
        from d2_norms.data import SafeDatasetMapper, check_datasets

        from .train_loader import SUPPORTED_SAMPLERS, build_resumable_train_loader

        check_datasets(cfg, deep=comm.is_main_process())
        mapper = SafeDatasetMapper(cfg, True)
        if cfg.DATALOADER.SAMPLER_TRAIN in SUPPORTED_SAMPLERS:
            return build_resumable_train_loader(cfg, mapper)
        from detectron2.data import build_detection_train_loader

        logger.warning("DATALOADER.SAMPLER_TRAIN=%s: using detectron2's loader; a resumed run "
                       "will not see the same samples as an uninterrupted one (supported: %s)",
                       cfg.DATALOADER.SAMPLER_TRAIN, SUPPORTED_SAMPLERS)
        return build_detection_train_loader(cfg, mapper=mapper)

    @classmethod
    def build_test_loader(cls, cfg, dataset_name):
        from detectron2.data import build_detection_test_loader

        from d2_norms.data import SafeDatasetMapper

        return build_detection_test_loader(cfg, dataset_name, mapper=SafeDatasetMapper(cfg, False))

    @classmethod
    def build_optimizer(cls, cfg, model):
        from d2_norms.solver import build_optimizer

        return build_optimizer(cfg, model)

    @classmethod
    def build_lr_scheduler(cls, cfg, optimizer):
        from d2_norms.solver import build_lr_scheduler

        return build_lr_scheduler(cfg, optimizer)

    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        from d2_norms.evaluation import build_evaluator

        return build_evaluator(cfg, dataset_name, output_folder)

    def build_hooks(self):
        """detectron2's default hooks with :class:`CheckpointHook` (atomic, finite-only, in
        every process) instead of PeriodicCheckpointer, and evaluation run with the RNG states
        restored afterwards, so that a run's random stream does not depend on when it
        evaluated (a resumed run did not evaluate where the killed one did)."""
        cfg = self.cfg.clone()
        cfg.defrost()
        cfg.DATALOADER.NUM_WORKERS = 0  # save some memory and time for PreciseBN
        ret = [
            hooks.IterationTimer(),
            hooks.LRScheduler(),
            hooks.PreciseBN(cfg.TEST.EVAL_PERIOD, self.model, self.build_train_loader(cfg),
                            cfg.TEST.PRECISE_BN.NUM_ITER)
            if cfg.TEST.PRECISE_BN.ENABLED and get_bn_modules(self.model) else None,
            CheckpointHook(self.checkpointer, cfg.SOLVER.CHECKPOINT_PERIOD),
        ]

        def test_and_save_results():
            with isolated_rng():
                self._last_eval_results = self.test(self.cfg, self.model)
            return self._last_eval_results

        ret.append(hooks.EvalHook(cfg.TEST.EVAL_PERIOD, test_and_save_results))
        if comm.is_main_process():
            ret.append(hooks.PeriodicWriter(self.build_writers(), period=20))
        return ret

    # -- checkpoint state ---------------------------------------------------------------------
    def state_dict(self):
        ret = super().state_dict()  # iteration, hook states (lr scheduler)
        ret["_trainer"] = self._trainer.state_dict()  # optimizer (+ AMP grad scaler)
        loader = self._trainer.data_loader
        if hasattr(loader, "set_position"):
            ret["data"] = {"seed": int(loader.seed), "world_size": comm.get_world_size()}
        if self._rng_states is not None:
            ret["rng"] = self._rng_states  # one entry per rank
        return ret

    def load_state_dict(self, state_dict):
        super().load_state_dict(state_dict)
        if "_trainer" in state_dict:
            self._trainer.load_state_dict(state_dict["_trainer"])
        else:
            logger.warning("the checkpoint has no optimizer state (written by another trainer?): "
                           "momentum restarts from zero")
        self._resumed_data = state_dict.get("data")
        self._resumed_rng = state_dict.get("rng")

    def prepare_checkpoint(self) -> None:
        """Called by CheckpointHook in every process at a checkpoint iteration: refuse
        non-finite weights (all processes agree) and gather the RNG states."""
        bad = non_finite_entries(self.model)
        everyone = comm.all_gather(bad) if comm.get_world_size() > 1 else [bad]
        if any(everyone):
            names = sorted({n for b in everyone for n in b})
            raise NonFiniteWeightsError(
                f"weights became non-finite at iteration {self.iter} (NaN/inf in "
                f"{', '.join(names[:8])}{' ...' if len(names) > 8 else ''}); not writing a "
                f"checkpoint from them. The last good checkpoint stays "
                f"{self._last_checkpoint_text()}.\n{divergence_remedies(self.cfg)}")
        self._rng_states = gather_rng_states()

    def _last_checkpoint_text(self) -> str:
        if comm.is_main_process() and self.checkpointer.has_checkpoint():
            path = self.checkpointer.get_checkpoint_file()
            if path:
                return path
        return "(none written yet in this output directory)"

    def _describe_non_finite_loss(self, iteration: int, per_rank: Optional[List[Dict[str, float]]],
                                  cause: Optional[str] = None) -> str:
        if per_rank is not None:
            means = {k: float(np.mean([d[k] for d in per_rank])) for k in per_rank[0]}
            bad = sorted({k for d in per_rank for k, v in d.items() if not math.isfinite(v)})
            ranks = [r for r, d in enumerate(per_rank)
                     if any(not math.isfinite(v) for v in d.values())]
            where = (f" (on process(es) {ranks} of {len(per_rank)}; losses averaged over "
                     "processes)" if len(per_rank) > 1 else "")
            what = (f"loss became non-finite at iteration {iteration} (of {self.max_iter}): "
                    f"{', '.join(bad)} is NaN/inf{where}.\nLosses: {format_values(means)}")
        else:
            last = self._trainer.last_finite_losses
            what = (f"the model produced non-finite values at iteration {iteration} (of "
                    f"{self.max_iter}) before its losses could be computed: {cause}\n"
                    + (f"Losses of the last finite step (iteration {last[0]}): "
                       f"{format_values(last[1])}" if last else "No step had finite losses."))
        return (f"{what}\n"
                f"Training stopped before the optimizer step, so the weights were not updated "
                f"from this step and no checkpoint was written after it; the last good checkpoint "
                f"is {self._last_checkpoint_text()} (continue from it with --resume after "
                f"changing the config).\n{divergence_remedies(self.cfg)}")

    # -- resume ------------------------------------------------------------------------------
    def resume_or_load(self, resume=True, *, allow_partial: bool = False,
                       allow_norm_mismatch: bool = False):
        """``resume``: continue from OUTPUT_DIR's last complete checkpoint - weights (which must
        match the model), optimizer, scheduler, iteration, RNG states, data order. Otherwise
        (or with no checkpoint there) load MODEL.WEIGHTS as initialisation (partial matches
        allowed, as in detectron2) and start at iteration 0."""
        from .preflight import check_weights_file, last_checkpoint_path

        self._resumed_data = self._resumed_rng = None
        path = last_checkpoint_path(self.cfg.OUTPUT_DIR) if resume else None
        if path:
            model = getattr(self.model, "module", self.model)
            shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
            logger.info("Loading checkpoint from %s to resume training", path)
            checkpoint = check_weights_file(self.cfg, path, shapes, action="resume",
                                            allow_partial=allow_partial,
                                            allow_norm_mismatch=allow_norm_mismatch)
            self.checkpointer.preloaded = (path, checkpoint)
            self.checkpointer.load(path)
            self.start_iter = self.iter + 1
            self._restore_run_state()
            self._apply_config_hyperparameters()
        else:
            self.checkpointer.load(self.cfg.MODEL.WEIGHTS, checkpointables=[])
            self.start_iter = 0
        loader = self._trainer.data_loader
        if hasattr(loader, "set_position"):
            seed = (self._resumed_data or {}).get("seed")
            loader.set_position(self.start_iter, seed)

    def _apply_config_hyperparameters(self):
        """The checkpoint restores the optimizer's state (momentum buffers) and the schedule's
        position; lr, weight decay and momentum come from the config, so that e.g. lowering
        SOLVER.BASE_LR and resuming after a divergence takes effect (detectron2 would keep the
        checkpoint's values). With an unchanged config this changes nothing."""
        from detectron2.solver.lr_scheduler import LRMultiplier

        groups = self.optimizer.param_groups
        if len(groups) != len(self._config_hparams):
            logger.warning("the checkpoint's optimizer has %d parameter groups, the config's "
                           "%d: keeping the checkpoint's hyper-parameters", len(groups),
                           len(self._config_hparams))
            return
        changed = set()
        for group, wanted in zip(groups, self._config_hparams):
            for key, value in wanted.items():
                if group.get(key) != value:
                    changed.add(key)
                    group[key] = value
        sched = self.scheduler
        if self._config_base_lrs and list(sched.base_lrs) != self._config_base_lrs:
            changed.add("lr")
            sched.base_lrs = list(self._config_base_lrs)
            for group, base in zip(groups, self._config_base_lrs):
                group["initial_lr"] = base
            if isinstance(sched, LRMultiplier):
                lrs = sched.get_lr()  # the lr of the next iteration at the new base
                for group, lr in zip(groups, lrs):
                    group["lr"] = lr
                sched._last_lr = lrs
        if changed:
            logger.warning("resuming with the config's %s, which differ from the checkpoint's",
                           ", ".join(sorted(changed)))

    def _restore_run_state(self):
        world, rank = comm.get_world_size(), comm.get_rank()
        data = self._resumed_data or {}
        if data.get("world_size", world) != world:
            logger.warning("the checkpoint was written by %s processes, this run has %d: the "
                           "data order and RNG streams cannot continue exactly",
                           data.get("world_size"), world)
        states = self._resumed_rng
        if states is not None and len(states) == world:
            restore_rng_state(states[rank])
        elif states is None:
            logger.warning("the checkpoint holds no RNG states: random draws restart from the "
                           "seed")

    def train(self):
        super().train()
        if comm.get_world_size() > 1:
            from d2_norms.engine.replicas import check_replicas_identical

            check_replicas_identical(self.model)
        return getattr(self, "_last_eval_results", None)
