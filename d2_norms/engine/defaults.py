"""What ``tools/train_net.py`` runs: config set-up, input checks, training, evaluation-only,
results files."""
import argparse
import logging
import sys

import torch
from detectron2.engine import default_argument_parser, default_setup
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger

logger = logging.getLogger("d2_norms")

ALLOW_PARTIAL_HELP = ("evaluate (--eval-only) or resume even if the weights do not match the "
                      "model: missing parts stay randomly initialised")
ALLOW_NORM_MISMATCH_HELP = ("use weights whose checkpoint records other normalizers than the "
                            "config builds (e.g. GN weights as the start of a GN+WS model)")


class _FlagsAnywhereParser(argparse.ArgumentParser):
    """detectron2's parser takes everything after the first KEY of the config overrides as
    overrides (argparse.REMAINDER), so ``... MODEL.WEIGHTS x --eval-only`` would silently merge
    "--eval-only" into the config. Here the parser's own options are recognised wherever they
    appear (config keys and values never look like ``--resume``)."""

    def parse_args(self, args=None, namespace=None):
        ns = super().parse_args(args, namespace)
        opts, rest = list(ns.opts or []), []
        i = 0
        while i < len(opts):
            action = self._option_string_actions.get(opts[i])
            if action is None or action.dest in ("help", "opts"):
                rest.append(opts[i])
                i += 1
                continue
            if action.nargs == 0:  # store_true flags
                setattr(ns, action.dest, action.const)
                i += 1
            else:
                if i + 1 >= len(opts):
                    self.error(f"argument {opts[i]}: expected one argument")
                value = opts[i + 1]
                setattr(ns, action.dest, action.type(value) if action.type else value)
                i += 2
        ns.opts = rest
        return ns


def argument_parser(epilog=None) -> argparse.ArgumentParser:
    """detectron2's CLI (--config-file, --num-gpus, --num-machines, --machine-rank, --dist-url,
    --resume, --eval-only, opts) plus --allow-partial-weights; ``--num-gpus`` means processes on
    CPU. The process flags default to None ("not given"): ``launch`` reads 1, 1, 0, auto, or
    under torchrun the launcher's values."""
    from .launch import let_launcher_decide

    base = default_argument_parser(epilog)
    # detectron2's arguments (the same action objects) in a parser that accepts them anywhere
    parser = _FlagsAnywhereParser(parents=[base], add_help=False, description=base.description,
                                  epilog=base.epilog, formatter_class=base.formatter_class)
    for action in parser._actions:
        if action.dest == "num_gpus":
            action.help = ("number of processes per machine: one per GPU with CUDA (NCCL), "
                           "CPU processes joined with gloo otherwise")
    let_launcher_decide(parser)  # None = not given; torchrun's values when it started us
    parser.add_argument("--allow-partial-weights", action="store_true", help=ALLOW_PARTIAL_HELP)
    parser.add_argument("--allow-norm-mismatch", action="store_true",
                        help=ALLOW_NORM_MISMATCH_HELP)
    return parser


def resolve_device(cfg) -> None:
    """MODEL.DEVICE 'cuda' on a machine without CUDA falls back to 'cpu' (logged)."""
    if str(cfg.MODEL.DEVICE).startswith("cuda") and not torch.cuda.is_available():
        logger.warning("MODEL.DEVICE=%s but CUDA is not available: using cpu", cfg.MODEL.DEVICE)
        cfg.MODEL.DEVICE = "cpu"


def setup_cfg(args, *, log: bool = True):
    """Build the frozen config from ``--config-file`` and ``opts`` (a key typo raises
    ConfigKeyError naming the file and close keys); run detectron2's default_setup (logger,
    config.yaml in OUTPUT_DIR, seeds) when ``log``."""
    from .preflight import load_config

    cfg = load_config(args.config_file, list(args.opts))
    resolve_device(cfg)
    cfg.freeze()
    if log:
        default_setup(cfg, args)
        # d2_norms' own messages (resume, checks, data order) to the console and log.txt too
        setup_logger(cfg.OUTPUT_DIR, distributed_rank=comm.get_rank(), name="d2_norms",
                     abbrev_name="d2n")
    return cfg


class YacsRun:
    """What differs between the two CLIs, for :func:`preflight` / :func:`main` /
    :func:`run_cli`: how the arguments become the engine's (yacs) settings, the model and the
    trainer. ``tools/train_net.py`` uses this one; ``tools/lazyconfig_train_net.py`` passes
    ``d2_norms.lazy.engine.LazyRun`` (a LazyConfig whose settings node is a yacs config).
    Stateless and picklable: it travels to spawned worker processes."""

    def setup_cfg(self, args, *, log: bool = True):
        return setup_cfg(args, log=log)

    def extra_checks(self, args, cfg) -> None:
        """Input checks beyond the shared ones (run in preflight, nothing written yet)."""

    def model_checks(self, args, cfg, problems):
        """The model's input problems (added to ``problems``); its state-dict shapes from a
        meta-device build, or None."""
        from d2_norms.config_checks import norm_problems

        from .preflight import check_model_builds

        norms = norm_problems(cfg)
        problems.extend(norms)
        if norms:  # the model can only be built once its norm names are right
            return None
        shapes = None
        with problems.check():
            shapes = check_model_builds(cfg, args.config_file)
        return shapes

    def build_model(self, cfg, args):
        from d2_norms.engine.trainer import Trainer

        return Trainer.build_model(cfg)

    def test(self, cfg, model, args):
        from d2_norms.engine.trainer import Trainer

        return Trainer.test(cfg, model)

    def trainer(self, cfg, args):
        from d2_norms.engine.trainer import Trainer

        return Trainer(cfg)


def preflight(args, world_size: int, run: "YacsRun" = None):
    """Every check that can fail on bad input, before worker processes start and before
    anything is written to OUTPUT_DIR. All problems are collected and raised together
    (:class:`~d2_norms.engine.errors.InputProblemsError`, one message, exit code 2).
    Returns the config."""
    from d2_norms.config_checks import image_group_problems
    from d2_norms.data import check_datasets

    from .errors import ConfigFileError, InputProblemsError, Problems, WeightsMismatchError
    from .preflight import (check_batch_split, check_weights_file, eval_weights_path,
                            last_checkpoint_path)

    run = run or YacsRun()
    if not getattr(args, "config_file", ""):
        raise InputProblemsError([ConfigFileError(
            "no --config-file given: pass --config-file configs/<config> (e.g. one of "
            "configs/COCO-scratch/*.yaml, or detectron2's model-zoo YAML with d2_norms' "
            "components)")])
    cfg = run.setup_cfg(args, log=False)  # a key typo stops here (the config is unknown)
    problems = Problems()
    with problems.check():
        run.extra_checks(args, cfg)
    if not args.eval_only:
        with problems.check():
            check_batch_split(cfg, world_size)
        with problems.check():
            check_datasets(cfg, deep=True)
    else:
        test_only = cfg.clone()  # evaluation needs only the test sets
        test_only.defrost()
        test_only.DATASETS.TRAIN = ()
        with problems.check():
            check_datasets(test_only, deep=True)
    before = len(problems.items)
    shapes = run.model_checks(args, cfg, problems)
    if not args.eval_only and len(problems.items) == before:  # norm names known
        problems.extend(image_group_problems(cfg, world_size))
    allow = getattr(args, "allow_partial_weights", False)
    allow_norms = getattr(args, "allow_norm_mismatch", False)
    override = ("(--allow-partial-weights " + ("evaluates" if args.eval_only else "resumes")
                + " anyway.)")
    checks = dict(config_file=args.config_file, allow_partial=allow, override=override,
                  allow_norm_mismatch=allow_norms)
    with problems.check():
        if args.eval_only:
            weights = eval_weights_path(cfg, args.resume)
            if not weights:
                raise WeightsMismatchError(
                    "--eval-only needs weights: set MODEL.WEIGHTS to a checkpoint (e.g. "
                    "OUTPUT_DIR/model_final.pth of a training run), or pass --resume with the "
                    "run's OUTPUT_DIR; evaluating a randomly initialised model is refused.")
            check_weights_file(cfg, weights, shapes, action="evaluate", **checks)
        else:
            path = last_checkpoint_path(cfg.OUTPUT_DIR) if args.resume else None
            if path:
                check_weights_file(cfg, path, shapes, action="resume", **checks)
            elif cfg.MODEL.WEIGHTS:
                # initialisation: partial matches are normal (a backbone-only file); the file
                # must be readable and made for this config's normalizers
                check_weights_file(cfg, cfg.MODEL.WEIGHTS, None, action="initialise from",
                                   **checks)
    problems.raise_if_any(args.config_file)
    return cfg


def _evaluate_only(cfg, args, run: "YacsRun" = None):
    from d2_norms.evaluation import save_results

    from .checkpoint import AtomicCheckpointer
    from .preflight import check_weights_file, eval_weights_path

    run = run or YacsRun()
    model = run.build_model(cfg, args)
    weights = eval_weights_path(cfg, args.resume)
    checkpointer = AtomicCheckpointer(model, save_dir=cfg.OUTPUT_DIR)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    checkpointer.preloaded = (weights, check_weights_file(
        cfg, weights, shapes, action="evaluate", config_file=args.config_file,
        allow_partial=getattr(args, "allow_partial_weights", False),
        allow_norm_mismatch=getattr(args, "allow_norm_mismatch", False)))
    extra = checkpointer.load(weights) or {}
    # Our checkpoints store the last finished iteration's index; training reports the number
    # of finished iterations (max_iter), so +1 here. Weights without it (converted/zoo): None.
    saved_iter = extra.get("iteration")
    iteration = int(saved_iter) + 1 if isinstance(saved_iter, (int, float)) else None
    results = run.test(cfg, model, args)
    if comm.is_main_process():
        save_results(cfg.OUTPUT_DIR, results, cfg, iteration=iteration,
                     dataset_name=",".join(cfg.DATASETS.TEST))
    return results


def main(args, run: "YacsRun" = None):
    """Entry point run in every process by ``launch``."""
    from d2_norms.evaluation import write_run_status

    run = run or YacsRun()
    if not getattr(args, "preflight_done", False):
        # Under torchrun the processes exist before any check could run: rank 0 checks (it may
        # generate a synthetic dataset; no two ranks race on its files), every rank stops on
        # its error.
        from .launch import run_on_main_process

        run_on_main_process(preflight, args, comm.get_world_size(), run)
    cfg = run.setup_cfg(args)
    if args.eval_only:
        return _evaluate_only(cfg, args, run)

    trainer = run.trainer(cfg, args)
    trainer.resume_or_load(resume=args.resume,
                           allow_partial=getattr(args, "allow_partial_weights", False),
                           allow_norm_mismatch=getattr(args, "allow_norm_mismatch", False))
    if comm.is_main_process():
        write_run_status(cfg.OUTPUT_DIR, "running", start_iter=trainer.start_iter,
                         max_iter=trainer.max_iter)
    try:
        results = trainer.train()
    except BaseException as e:
        if comm.is_main_process():
            write_run_status(cfg.OUTPUT_DIR, "failed", iteration=trainer.iter,
                             error=f"{type(e).__name__}: {e}")
        raise
    if comm.is_main_process():
        from d2_norms.evaluation import save_results

        if results:
            save_results(cfg.OUTPUT_DIR, results, cfg, iteration=trainer.max_iter,
                         dataset_name=",".join(cfg.DATASETS.TEST))
        write_run_status(cfg.OUTPUT_DIR, "finished", iteration=trainer.max_iter)
    return results


def run_cli(argv=None, run: "YacsRun" = None):
    """Parse, check the input (once, before any process starts or file is written), launch.

    Under torchrun (or a scheduler setting its variables) this runs in every process: the
    launcher's environment and the process flags are checked first (each process exits 2 on a
    mismatch), then ``launch`` joins the launcher's group and ``main`` runs the input checks on
    rank 0 before anything is written."""
    from d2_norms.engine.launch import launch, launcher_environment

    from .errors import NonFiniteLossError, NonFiniteWeightsError, user_error_types

    args = argument_parser().parse_args(argv)
    print("Command Line Args:", args)
    run = run or YacsRun()
    try:
        if launcher_environment() is None:
            preflight(args, (args.num_gpus or 1) * (args.num_machines or 1), run)
            args.preflight_done = True
        launch(main, args.num_gpus, num_machines=args.num_machines,
               machine_rank=args.machine_rank, dist_url=args.dist_url, args=(args, run))
    except user_error_types() as e:
        # Input mistakes and a diverged run: the message says what to do; the traceback (in
        # log.txt for a training run) would only hide it.
        diverged = isinstance(e, (NonFiniteLossError, NonFiniteWeightsError))
        print(f"\nERROR ({type(e).__name__}): {e}", file=sys.stderr)
        sys.exit(1 if diverged else 2)
