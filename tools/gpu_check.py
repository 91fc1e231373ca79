#!/usr/bin/env python
"""CUDA smoke check of d2_norms: real training steps with every normalizer, and FRN's compiled
kernel against eager, on one GPU, in a few minutes.

What it checks (each part can be skipped):

1. training - for each normalizer (BN, GN, GNWS, FRN, NF) and detector (Mask R-CNN R18-FPN,
   RetinaNet R18-FPN P3-P7), a few iterations of d2_norms' trainer (``d2_norms.engine``: the
   config path, input checks and Trainer of ``tools/train_net.py``) on the synthetic shapes set
   (``configs/synthetic/mask_rcnn_R18_FPN_GN.yaml``; generated into ``$D2_NORMS_CACHE`` on
   first use), in float32 and with AMP (``SOLVER.AMP.ENABLED``). A run passes when every loss
   is finite (the trainer stops on the first NaN/inf) and it finishes; reported per run: step
   time (median s/it after the first iterations, CUDA-synchronized), peak CUDA memory
   (``torch.cuda.max_memory_allocated``), first and last total loss. The float32 Mask R-CNN
   run of ``--eval-norm`` also evaluates (bbox + segm) on the validation split through
   d2_norms' COCO evaluator.
2. FRN kernels - ``d2_norms.layers.FilterResponseNorm2d`` forward + backward with the
   ``torch.compile`` kernels against the eager kernels (``D2_NORMS_FRN_IMPL``), and both against
   FRN written here in float64 (eq. 1-3 of the FRN paper): max |difference| of the output and
   of every gradient, for float32 / float16 / bfloat16 inputs, short and long rows
   (H*W > 4096), 1x1 maps with a learned eps.
3. export - ``tools/export_model.py`` on the device: the Mask R-CNN of ``--export-norm`` with
   the weights its float32 training run wrote, folded (GNWS/NF) and exported to TorchScript
   (``--export-method``), re-loaded and compared with the eager model (max |difference| per
   output field, detections and classes must match).

4. layer timings - ``tools/benchmark_layers.py``'s table on the device: FRN+TLU (eager and
   compiled kernels), GN+ReLU, BN+ReLU, timm's FRN+TLU, WS / Scaled WS convs against plain and
   timm's convs, fp32 and bf16, at its default shapes (FPN P3 and P2 included): ms, ratio,
   achieved GB/s against the byte floor; op counts per forward+backward.
5. whole-model timings - ``tools/benchmark_train.py``'s step (s/it) and inference time of
   RetinaNet and Mask R-CNN R50-FPN at ``--model-size`` (800) px, ``--model-ims`` (1 2) images,
   for every normalizer, in fp32 and with AMP bf16, with ratios against BN / FrozenBN.

It prints a summary table and, with ``--json``, writes every number to a file (rewritten after
each check, so a killed run leaves what it measured). ``--time-budget`` starts no new run after
that many seconds and reports the rest as skipped. Exit status 0 when no check failed, 1 when
one did, 2 on bad arguments (e.g. no CUDA).

    python tools/gpu_check.py --json gpu_check.json
    python tools/gpu_check.py --time-budget 170 --json gpu_check.json  # under a time limit
    python tools/gpu_check.py --norms FRN GN --detectors retinanet --iters 40 --amp on
    python tools/gpu_check.py --device cpu --iters 2 --amp off --skip-frn-kernels  # local try
    python tools/gpu_check.py --skip-train --skip-frn-kernels --export-norm none  # timings
"""
import argparse
import gc
import json
import logging
import math
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
import traceback

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:  # run as a script from anywhere: d2_norms lives next to tools/
    sys.path.insert(0, REPO)

import d2_norms  # noqa: E402  (shims + registrations before detectron2 builds anything)
from detectron2.engine import HookBase  # noqa: E402

NORMS = ("BN", "GN", "GNWS", "FRN", "NF")
DETECTORS = ("mask_rcnn", "retinanet")
DETECTOR_TITLES = {"mask_rcnn": "Mask R-CNN R18-FPN", "retinanet": "RetinaNet R18-FPN"}
CONFIG = os.path.join("configs", "synthetic", "mask_rcnn_R18_FPN_GN.yaml")
# Steps left out of the s/it median: cuDNN autotuning, allocator growth, FRN compilation.
WARMUP_STEPS = 5

# RetinaNet on the same synthetic set: P3-P7 heads; 256 px inputs (the 128 px images upscaled)
# so that P7 is 2x2 rather than 1x1, anchors matched to the 16-128 px objects at that size.
RETINANET_OPTS = [
    "MODEL.META_ARCHITECTURE", "RetinaNet",
    "MODEL.MASK_ON", "False",
    "MODEL.BACKBONE.NAME", "build_d2n_retinanet_resnet_fpn_backbone",
    "MODEL.RESNETS.OUT_FEATURES", "['res3', 'res4', 'res5']",
    "MODEL.FPN.IN_FEATURES", "['res3', 'res4', 'res5']",
    "MODEL.RETINANET.NUM_CLASSES", "3",
    "MODEL.ANCHOR_GENERATOR.SIZES", "[[16], [32], [64], [128], [256]]",
    "INPUT.MIN_SIZE_TRAIN", "(256,)", "INPUT.MAX_SIZE_TRAIN", "256",
    "INPUT.MIN_SIZE_TEST", "256", "INPUT.MAX_SIZE_TEST", "256",
]
NORM_KEYS = {
    "mask_rcnn": ("MODEL.RESNETS.NORM", "MODEL.FPN.NORM", "MODEL.ROI_BOX_HEAD.NORM",
                  "MODEL.ROI_MASK_HEAD.NORM"),
    "retinanet": ("MODEL.RESNETS.NORM", "MODEL.FPN.NORM", "MODEL.RETINANET.NORM"),
}

# FRN kernel cases: (name, shape, dtype, tlu, learned eps). Rows of H*W <= 4096 and longer ones
# compile to different graphs (see d2_norms/layers/frn.py), as do 1x1 maps.
FRN_CASES = [
    ("fp32 TLU 2x64x56x56", (2, 64, 56, 56), "float32", True, False),
    ("fp32 no TLU 3x96x25x38", (3, 96, 25, 38), "float32", False, False),
    ("fp32 TLU long rows 2x32x80x96", (2, 32, 80, 96), "float32", True, False),
    ("fp32 TLU 1x1 learned eps 16x256x1x1", (16, 256, 1, 1), "float32", True, True),
    ("fp16 TLU 2x64x56x56", (2, 64, 56, 56), "float16", True, False),
    ("bf16 TLU 2x64x56x56", (2, 64, 56, 56), "bfloat16", True, False),
]
# Largest accepted |compiled - eager| and |impl - float64 reference|, relative to the
# reference's largest magnitude (per tensor): float32 math in both kernels, so only summation
# order differs; half-precision outputs are rounded to their dtype (2^-11 / 2^-8).
FRN_TOLERANCE = {"float32": 1e-4, "float16": 4e-3, "bfloat16": 3e-2}

logger = logging.getLogger("d2_norms.gpu_check")


# -------------------------------------------------------------------------------- arguments
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"],
                   help="cuda (the point of this check; refused when CUDA is absent) or cpu "
                        "(to try the script on a machine without a GPU)")
    p.add_argument("--norms", nargs="+", default=list(NORMS), choices=list(NORMS))
    p.add_argument("--detectors", nargs="+", default=list(DETECTORS), choices=list(DETECTORS))
    p.add_argument("--iters", type=int, default=20, help="training iterations per run")
    p.add_argument("--ims", type=int, default=4, help="images per batch (SOLVER.IMS_PER_BATCH)")
    p.add_argument("--amp", default=None, choices=["both", "off", "on"],
                   help="float32 (off), AMP (on) or both runs per model (default: both on "
                        "CUDA, off on CPU; AMP needs CUDA)")
    p.add_argument("--workers", type=int, default=4, help="DATALOADER.NUM_WORKERS")
    p.add_argument("--train-set", default="synthetic_shapes_train")
    p.add_argument("--test-set", default="synthetic_shapes_val")
    p.add_argument("--eval-norm", default="GN", choices=list(NORMS) + ["none"],
                   help="evaluate the float32 Mask R-CNN run of this normalizer on --test-set "
                        "(RetinaNet too when it is the only detector); 'none' skips it")
    p.add_argument("--skip-train", action="store_true", help="skip the training runs")
    p.add_argument("--skip-frn-kernels", action="store_true",
                   help="skip the compiled-vs-eager FRN kernel comparison")
    p.add_argument("--export-norm", default="NF", choices=list(NORMS) + ["none"],
                   help="export the Mask R-CNN of this normalizer with tools/export_model.py "
                        "and compare it with eager (weights of its float32 training run); "
                        "'none' skips the export check")
    p.add_argument("--export-method", default="trace", choices=["trace", "script"])
    p.add_argument("--export-atol", type=float, default=1e-3,
                   help="largest accepted |exported - eager| (TF32 convolutions on CUDA make "
                        "1e-4 too tight for an untrained model's scores)")
    p.add_argument("--layers", default=None, choices=["on", "off"],
                   help="layer timings (tools/benchmark_layers.py); default on with CUDA, off "
                        "on CPU")
    p.add_argument("--layer-shapes", nargs="+", default=None, metavar="NxCxHxW",
                   help="norm input shapes for the layer timings (default: the tool's)")
    p.add_argument("--layer-conv-shapes", nargs="+", default=None, metavar="NxCxHxW")
    p.add_argument("--layer-reps", type=int, default=20)
    p.add_argument("--models", default=None, choices=["on", "off"],
                   help="whole-model timings (tools/benchmark_train.py); default on with "
                        "CUDA, off on CPU (800 px R50 steps take seconds each there)")
    p.add_argument("--model-size", type=int, default=800, help="image size for the models")
    p.add_argument("--model-ims", nargs="+", type=int, default=[1, 2])
    p.add_argument("--model-rounds", type=int, default=3)
    p.add_argument("--model-depth", type=int, default=50, choices=[18, 34, 50, 101])
    p.add_argument("--model-amp", nargs="+", default=None, choices=["off", "bf16"],
                   help="default: off bf16 on CUDA, off on CPU")
    p.add_argument("--output-dir", default=None,
                   help="where the runs write (default: a temporary directory, removed after)")
    p.add_argument("--keep-outputs", action="store_true",
                   help="keep each run's OUTPUT_DIR (checkpoints, metrics.json)")
    p.add_argument("--time-budget", type=float, default=None, metavar="SECONDS",
                   help="start no further training run or export after this many seconds "
                        "(they are reported as skipped), so that a caller's time limit still "
                        "gets the summary")
    p.add_argument("--json", help="write every number to this file (rewritten after every "
                                  "check)")
    p.add_argument("--verbose", action="store_true", help="show detectron2's INFO log")
    args = p.parse_args(argv)
    if args.iters < 1:
        p.error(f"--iters must be >= 1, got {args.iters}")
    if args.ims < 1:
        p.error(f"--ims must be >= 1, got {args.ims}")
    if args.workers < 0:
        p.error(f"--workers must be >= 0, got {args.workers}")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda, but CUDA is not available here (torch "
                f"{torch.__version__}, torch.version.cuda={torch.version.cuda}). Run this on a "
                "machine with an NVIDIA GPU and a CUDA build of torch, or pass --device cpu "
                "to try the script on CPU.")
    if args.amp is None:
        args.amp = "both" if args.device == "cuda" else "off"
    for name in ("layers", "models"):
        if getattr(args, name) is None:
            setattr(args, name, "on" if args.device == "cuda" else "off")
    if args.model_amp is None:
        args.model_amp = ["off", "bf16"] if args.device == "cuda" else ["off"]
    if args.layer_reps < 1 or args.model_rounds < 1 or min(args.model_ims) < 1:
        p.error("--layer-reps, --model-rounds and --model-ims must be >= 1")
    if args.device == "cpu" and args.amp != "off":
        p.error(f"--amp {args.amp} needs CUDA (detectron2's AMPTrainer); use --amp off with "
                "--device cpu")
    return args


def amp_modes(args):
    return {"both": [False, True], "off": [False], "on": [True]}[args.amp]


# -------------------------------------------------------------------------------- training
class StepRecorder(HookBase):
    """Per-iteration wall time of the training step (synchronized with the GPU on both ends)
    and the losses the trainer logged for it. Registered as the first hook, so its
    ``after_step`` runs before checkpointing/evaluation hooks of the last iteration."""

    def __init__(self, device: torch.device):
        self.device = device
        self.seconds = []
        self.total_losses = []
        self._t0 = None

    def _sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def before_step(self):
        self._sync()
        self._t0 = time.perf_counter()

    def after_step(self):
        self._sync()
        self.seconds.append(time.perf_counter() - self._t0)
        last = self.trainer._trainer.last_finite_losses  # (iteration, {loss: value})
        if last is not None and last[0] == self.trainer.iter:
            self.total_losses.append(float(sum(last[1].values())))


def make_trainer_class():
    from detectron2.utils.events import CommonMetricPrinter, JSONWriter

    from d2_norms.engine import Trainer

    class CheckTrainer(Trainer):
        """d2_norms' Trainer plus a :class:`StepRecorder`; without tensorboard installed the
        event-file writer is left out (detectron2's default writers import it)."""

        def build_hooks(self):
            self.step_recorder = StepRecorder(torch.device(self.cfg.MODEL.DEVICE))
            return [self.step_recorder] + super().build_hooks()

        def build_writers(self):
            try:
                import tensorboard  # noqa: F401
            except ImportError:
                return [CommonMetricPrinter(self.max_iter),
                        JSONWriter(os.path.join(self.cfg.OUTPUT_DIR, "metrics.json"))]
            return super().build_writers()

    return CheckTrainer


def run_opts(detector, norm, amp, args, output_dir, evaluate):
    opts = []
    if detector == "retinanet":
        opts += RETINANET_OPTS
    for key in NORM_KEYS[detector]:
        opts += [key, norm]
    opts += [
        "MODEL.DEVICE", args.device,
        "SOLVER.AMP.ENABLED", str(amp),
        "SOLVER.IMS_PER_BATCH", str(args.ims),
        "SOLVER.MAX_ITER", str(args.iters),
        "SOLVER.STEPS", "()",
        "SOLVER.CHECKPOINT_PERIOD", str(10 ** 8),  # only the final checkpoint
        "DATALOADER.NUM_WORKERS", str(args.workers),
        "DATASETS.TRAIN", f"('{args.train_set}',)",
        "DATASETS.TEST", f"('{args.test_set}',)" if evaluate else "()",
        "TEST.EVAL_PERIOD", "0",
        "OUTPUT_DIR", output_dir,
    ]
    return opts


def train_once(detector, norm, amp, args, root, evaluate, keep_weights=False):
    """One short training run through d2_norms' engine; returns its record (never raises for a
    failed run: the failure is recorded). ``keep_weights``: leave the run's directory for the
    export check (``record["weights"]``)."""
    from detectron2.utils.env import seed_all_rng

    from d2_norms.engine.defaults import argument_parser, preflight, setup_cfg
    from d2_norms.layers import get_frn_impl

    name = f"{detector}_{norm}_{'amp' if amp else 'fp32'}"
    output_dir = os.path.join(root, name)
    record = {"detector": detector, "norm": norm, "amp": amp, "iters": args.iters,
              "ims_per_batch": args.ims, "evaluated": evaluate, "ok": False}
    device = torch.device(args.device)
    trainer = None
    start = time.perf_counter()
    try:
        cli = argument_parser().parse_args(
            ["--config-file", os.path.join(REPO, CONFIG),
             *run_opts(detector, norm, amp, args, output_dir, evaluate)])
        preflight(cli, 1)  # what tools/train_net.py checks before it starts
        cfg = setup_cfg(cli, log=False)
        os.makedirs(cfg.OUTPUT_DIR, exist_ok=True)
        seed_all_rng(cfg.SEED)
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        trainer = make_trainer_class()(cfg)
        trainer.resume_or_load(resume=False)
        results = trainer.train()
        recorder = trainer.step_recorder
        losses = recorder.total_losses
        finite = len(losses) == args.iters and all(math.isfinite(v) for v in losses)
        timed = recorder.seconds[WARMUP_STEPS:] if len(recorder.seconds) > WARMUP_STEPS + 1 \
            else recorder.seconds[1:] or recorder.seconds
        record.update({
            "s_per_it": statistics.median(timed),
            "s_per_it_mean": statistics.fmean(timed),
            "first_step_s": recorder.seconds[0],
            "step_seconds": recorder.seconds,
            "total_losses": losses,
            "first_loss": losses[0] if losses else None,
            "last_loss": losses[-1] if losses else None,
            "final_checkpoint": os.path.isfile(os.path.join(output_dir, "model_final.pth")),
        })
        if device.type == "cuda":
            record["peak_allocated_mib"] = torch.cuda.max_memory_allocated(device) / 2 ** 20
            record["peak_reserved_mib"] = torch.cuda.max_memory_reserved(device) / 2 ** 20
        if evaluate:
            record["eval"] = _flatten_metrics(results)
        problems = []
        if not finite:
            problems.append(f"{len(losses)} of {args.iters} iterations logged finite losses")
        if not record["final_checkpoint"]:
            problems.append("no model_final.pth written")
        if evaluate and not record["eval"]:
            problems.append("evaluation returned no metrics")
        record["ok"] = not problems
        if problems:
            record["error"] = "; ".join(problems)
    except Exception as e:  # noqa: BLE001 - every failure is reported, the next run goes on
        record["error"] = f"{type(e).__name__}: {e}"
        record["traceback"] = traceback.format_exc()
        recorder = getattr(trainer, "step_recorder", None)
        if recorder is not None:  # how far it got
            record["step_seconds"] = recorder.seconds
            record["total_losses"] = recorder.total_losses
    finally:
        record["frn_impl"] = get_frn_impl()
        record["wall_s"] = time.perf_counter() - start
        del trainer
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        weights = os.path.join(output_dir, "model_final.pth")
        if keep_weights and record["ok"] and os.path.isfile(weights):
            record["weights"] = weights
        elif not args.keep_outputs:
            shutil.rmtree(output_dir, ignore_errors=True)
    return record


def _flatten_metrics(results):
    """{"bbox/AP50": value, ...} from the trainer's (possibly per-dataset) results."""
    out = {}
    if not results:
        return out
    if all(isinstance(v, dict) and all(isinstance(w, dict) for w in v.values())
           for v in results.values()):  # several datasets: {dataset: {task: metrics}}
        results = next(iter(results.values()))
    for task, metrics in results.items():
        for key, value in metrics.items():
            if isinstance(value, (int, float)):
                out[f"{task}/{key}"] = float(value)
    return out


def out_of_time(args, started):
    return args.time_budget is not None and time.perf_counter() - started > args.time_budget


def run_training(args, root, on_record=None, started=None):
    records = []
    eval_detector = args.detectors[0]  # Mask R-CNN unless only RetinaNet runs
    for detector in args.detectors:
        for norm in args.norms:
            for amp in amp_modes(args):
                evaluate = norm == args.eval_norm and not amp and detector == eval_detector
                label = f"{DETECTOR_TITLES[detector]} {norm} {'AMP' if amp else 'fp32'}"
                if started is not None and out_of_time(args, started):
                    rec = {"detector": detector, "norm": norm, "amp": amp, "ok": None,
                           "skipped": f"--time-budget {args.time_budget:g} s used up"}
                    print(f"[train] {label}: skipped ({rec['skipped']})", flush=True)
                    records.append(rec)
                    if on_record is not None:
                        on_record(rec)
                    continue
                print(f"[train] {label}: {args.iters} it x {args.ims} img ...", flush=True)
                keep = detector == "mask_rcnn" and norm == args.export_norm and not amp
                rec = train_once(detector, norm, amp, args, root, evaluate, keep_weights=keep)
                records.append(rec)
                if on_record is not None:
                    on_record(rec)
                if rec["ok"]:
                    mem = (f", peak {rec['peak_allocated_mib']:.0f} MiB"
                           if "peak_allocated_mib" in rec else "")
                    ev = ""
                    if rec.get("eval"):
                        ev = ", " + ", ".join(f"{k} {v:.1f}" for k, v in rec["eval"].items()
                                              if k.endswith("/AP50"))
                    print(f"[train] {label}: ok, {rec['s_per_it']:.3f} s/it{mem}, loss "
                          f"{rec['first_loss']:.3f} -> {rec['last_loss']:.3f}{ev} "
                          f"({rec['wall_s']:.0f} s)", flush=True)
                else:
                    print(f"[train] {label}: FAILED: {rec['error']}", flush=True)
                    if "traceback" in rec:
                        print(rec["traceback"], flush=True)
    return records


# ---------------------------------------------------------------------------- FRN kernels
def frn_float64(x, weight, bias, tau, eps):
    """FRN eq. 1-2 (+ TLU eq. 3) in float64 with plain autograd ops: the reference."""
    x = x.double()
    nu2 = x.square().mean(dim=(2, 3), keepdim=True)
    y = x * torch.rsqrt(nu2 + eps.double()) * weight.double().view(1, -1, 1, 1) \
        + bias.double().view(1, -1, 1, 1)
    if tau is not None:
        y = torch.maximum(y, tau.double().view(1, -1, 1, 1))
    return y


def _frn_case_tensors(shape, dtype, tlu, learned_eps, device, seed):
    from d2_norms.layers import FilterResponseNorm2d

    g = torch.Generator().manual_seed(seed)
    c = shape[1]
    layer = FilterResponseNorm2d(c, tlu=tlu, learned_eps=learned_eps)
    with torch.no_grad():  # away from the initial values, so every gradient term matters
        layer.weight.copy_(1 + 0.3 * torch.randn(c, generator=g))
        layer.bias.copy_(0.2 * torch.randn(c, generator=g))
        if tlu:
            layer.tau.copy_(0.2 * torch.randn(c, generator=g))
    layer = layer.to(device)
    x = (torch.randn(shape, generator=g) * 2 + 0.5).to(device=device, dtype=dtype)
    grad = torch.randn(shape, generator=g).to(device=device, dtype=dtype)
    if tlu:
        # Where FRN's output lies within rounding of tau, TLU's branch (and so the gradient of
        # that element) may legitimately differ between float32 kernels and float64: no
        # upstream gradient there, so the comparison tests the kernels, not the coin flip.
        with torch.no_grad():
            eps = torch.tensor(layer.eps, dtype=torch.float64, device=device)
            if learned_eps:
                eps = eps + layer.eps_l.double().abs()
            y = frn_float64(x, layer.weight, layer.bias, None, eps)
            near_tau = (y - layer.tau.double().view(1, -1, 1, 1)).abs() < 1e-3 * y.abs().max()
            grad = grad.masked_fill(near_tau, 0)
    return layer, x, grad


def _frn_run(layer, x, grad, impl):
    """Output and gradients (x, then every parameter) of one forward+backward with ``impl``."""
    from d2_norms.layers import frn as frn_module

    previous = frn_module._IMPL
    frn_module.set_frn_impl(impl)
    try:
        layer.zero_grad(set_to_none=True)
        xi = x.detach().clone().requires_grad_(True)
        out = layer(xi)
        out.backward(grad)
        grads = [xi.grad] + [p.grad for _, p in layer.named_parameters()]
    finally:
        frn_module.set_frn_impl(previous)
    names = ["out", "grad_x"] + [f"grad_{n}" for n, _ in layer.named_parameters()]
    return dict(zip(names, [out.detach()] + [t.detach() for t in grads]))


def _reference_run(layer, x, grad):
    params = dict(layer.named_parameters())
    ref = {n: p.detach().double().requires_grad_(True) for n, p in params.items()}
    xi = x.detach().double().requires_grad_(True)
    eps = (layer.eps + ref["eps_l"].abs()) if "eps_l" in ref else torch.tensor(
        layer.eps, dtype=torch.float64, device=x.device)
    out = frn_float64(xi, ref["weight"], ref["bias"], ref.get("tau"), eps)
    out.backward(grad.double())
    result = {"out": out.detach(), "grad_x": xi.grad}
    result.update({f"grad_{n}": ref[n].grad for n in params})
    return result


def _rel_diff(a, b, scale):
    return float((a.double() - b.double()).abs().max() / max(float(scale), 1e-30))


def check_frn_kernels(device):
    """Compiled vs eager FRN kernels (and both vs float64) on ``device``; a list of records."""
    from d2_norms.layers import frn as frn_module

    records = []
    if not frn_module.frn_compiled_available():
        reason = frn_module._COMPILED.broken
        print(f"[frn] torch.compile unavailable here: {reason}", flush=True)
        return [{"case": "all", "ok": False, "error": f"torch.compile unavailable: {reason}"}]
    for seed, (name, shape, dtype_name, tlu, learned_eps) in enumerate(FRN_CASES):
        dtype = getattr(torch, dtype_name)
        rec = {"case": name, "shape": list(shape), "dtype": dtype_name, "tlu": tlu,
               "learned_eps": learned_eps, "ok": False}
        try:
            layer, x, grad = _frn_case_tensors(shape, dtype, tlu, learned_eps, device, seed)
            eager = _frn_run(layer, x, grad, "eager")
            t0 = time.perf_counter()
            compiled = _frn_run(layer, x, grad, "compiled")
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            rec["first_compiled_call_s"] = time.perf_counter() - t0
            reference = _reference_run(layer, x, grad)
            tol = FRN_TOLERANCE[dtype_name]
            rec["tolerance_rel"] = tol
            worst = {}
            for key, ref in reference.items():
                scale = ref.abs().max()
                worst[key] = {
                    "compiled_vs_eager_abs": float((compiled[key].double()
                                                    - eager[key].double()).abs().max()),
                    "compiled_vs_eager_rel": _rel_diff(compiled[key], eager[key], scale),
                    "eager_vs_float64_rel": _rel_diff(eager[key], ref, scale),
                    "compiled_vs_float64_rel": _rel_diff(compiled[key], ref, scale),
                }
            rec["diffs"] = worst
            rec["max_compiled_vs_eager_rel"] = max(w["compiled_vs_eager_rel"]
                                                   for w in worst.values())
            rec["max_vs_float64_rel"] = max(max(w["eager_vs_float64_rel"],
                                                w["compiled_vs_float64_rel"])
                                            for w in worst.values())
            bad = [f"{k} {kind} {v:.2e}" for k, w in worst.items() for kind, v in w.items()
                   if kind.endswith("_rel") and not v <= tol]
            rec["ok"] = not bad
            if bad:
                rec["error"] = f"above {tol:g} (relative): " + ", ".join(bad)
        except Exception as e:  # noqa: BLE001 - reported, the next case goes on
            rec["error"] = f"{type(e).__name__}: {e}"
            rec["traceback"] = traceback.format_exc()
        status = "ok" if rec["ok"] else f"FAILED: {rec['error']}"
        extra = (f" compiled-vs-eager {rec['max_compiled_vs_eager_rel']:.1e}, vs float64 "
                 f"{rec['max_vs_float64_rel']:.1e}" if "max_vs_float64_rel" in rec else "")
        print(f"[frn] {name}:{extra} {status}", flush=True)
        records.append(rec)
    try:
        sizes = frn_module.frn_compile_cache_sizes()
    except Exception as e:  # noqa: BLE001 - a private dynamo helper; informative only
        sizes = f"unavailable ({type(e).__name__})"
    records.append({"case": "compiled graphs per kernel", "ok": True, "cache_sizes": sizes})
    print(f"[frn] compiled graphs per kernel: {sizes}", flush=True)
    return records


# ----------------------------------------------------------------------------------- timings
def _load_tool(name):
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"d2_norms_{name}",
                                                  os.path.join(REPO, "tools", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def check_layer_timings(device, args):
    """tools/benchmark_layers.py's op counts and fp32 / bf16 time tables on ``device``."""
    rec = {"check": "layers", "ok": False}
    start = time.perf_counter()
    try:
        bench = _load_tool("benchmark_layers")
        norm_shapes = [bench.parse_shape(t) for t in (args.layer_shapes or bench.NORM_SHAPES)]
        conv_shapes = [bench.parse_shape(t)
                       for t in (args.layer_conv_shapes or bench.CONV_SHAPES)]
        targs = argparse.Namespace(reps=args.layer_reps, warmup=3)
        rec["ops"] = {**bench.op_counts(bench.norm_candidates),
                      **bench.op_counts(bench.conv_candidates)}
        rows = []
        for dtype in ("fp32", "bf16"):
            for kind, shapes, make, base in (
                    ("norm", norm_shapes, bench.norm_candidates, "GN+ReLU"),
                    ("conv", conv_shapes, bench.conv_candidates, "conv plain")):
                got = bench.time_table(kind, shapes, make, base, dtype, targs, device)
                rows += [dict(r, kind=kind, dtype=dtype, shape="x".join(map(str, r["shape"])))
                         for r in got]
                print(f"[layers] {kind} {dtype}: {len(got)} timings", flush=True)
        rec["rows"] = rows
        rec["ok"] = True
    except Exception as e:  # noqa: BLE001 - reported like any other failed check
        rec["error"] = f"{type(e).__name__}: {e}"
        rec["traceback"] = traceback.format_exc()
        print(f"[layers] FAILED: {rec['error']}", flush=True)
    rec["wall_s"] = time.perf_counter() - start
    return rec


def check_model_timings(device, args, started=None):
    """tools/benchmark_train.py per detector and AMP mode: step and inference ms per norm."""
    records = []
    bench = _load_tool("benchmark_train")
    for amp in args.model_amp:
        for detector in ("retinanet", "mask_rcnn"):
            rec = {"check": "models", "detector": detector, "amp": amp, "ok": False}
            if started is not None and out_of_time(args, started):
                rec.update(ok=None, skipped=f"--time-budget {args.time_budget:g} s used up")
                print(f"[models] {detector} {amp}: skipped", flush=True)
                records.append(rec)
                continue
            start = time.perf_counter()
            try:
                targs = bench.parse_args([
                    "--detectors", detector, "--ims", *map(str, args.model_ims),
                    "--size", str(args.model_size), "--rounds", str(args.model_rounds),
                    "--depth", str(args.model_depth), "--amp", amp, "--warmup", "1"])
                result = bench.run_detector(detector, targs, device)
                rec.update(size=args.model_size, train=result["train"],
                           inference=result["inference"],
                           fold_max_rel_diff=result["fold_max_rel_diff"], ok=True)
                steps = ", ".join(f"{r['norm']} {r['ims']}img {r['step_ms'] / 1e3:.3f}s "
                                  f"({r['step_x_bn']:.2f}x)" for r in result["train"])
                print(f"[models] {detector} {amp}: {steps}", flush=True)
            except Exception as e:  # noqa: BLE001
                rec["error"] = f"{type(e).__name__}: {e}"
                rec["traceback"] = traceback.format_exc()
                print(f"[models] {detector} {amp}: FAILED: {rec['error']}", flush=True)
            rec["wall_s"] = time.perf_counter() - start
            records.append(rec)
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return records


# ----------------------------------------------------------------------------------- export
def check_export(args, weights, root):
    """tools/export_model.py on the Mask R-CNN of ``--export-norm``; its record."""
    import contextlib
    import importlib.util
    import io

    rec = {"check": "export", "detector": "mask_rcnn", "norm": args.export_norm,
           "method": args.export_method, "weights": weights, "atol": args.export_atol,
           "ok": False}
    tool = os.path.join(REPO, "tools", "export_model.py")
    if not os.path.isfile(tool):
        rec.update(ok=True, skipped="tools/export_model.py is not in this checkout")
        return rec
    output = os.path.join(root, "export")
    argv = ["--config-file", os.path.join(REPO, CONFIG), "--method", args.export_method,
            "--output", output, "--atol", str(args.export_atol)]
    if weights:
        argv += ["--weights", weights]
    else:
        rec["note"] = "no trained weights (training skipped or failed): random initialisation"
    opts = []
    for key in NORM_KEYS["mask_rcnn"]:
        opts += [key, args.export_norm]
    argv += opts + ["MODEL.DEVICE", args.device]
    start = time.perf_counter()
    stdout = io.StringIO()
    try:
        spec = importlib.util.spec_from_file_location("d2_norms_export_model", tool)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        with contextlib.redirect_stdout(stdout):
            status = module.main(argv)
        text = stdout.getvalue()
        rec["exit_status"] = status
        start_json = text.find("{")
        if start_json >= 0:
            info, _ = json.JSONDecoder().raw_decode(text[start_json:])
            rec.update({k: info[k] for k in ("folded_convs", "outputs", "detections",
                                             "max_abs_diff") if k in info})
        rec["ok"] = status == 0
        if status != 0:
            rec["error"] = f"tools/export_model.py exited with {status}: {text[-1500:]}"
    except Exception as e:  # noqa: BLE001 - reported like any other failed check
        rec["error"] = f"{type(e).__name__}: {e}"
        rec["traceback"] = traceback.format_exc()
        rec["output"] = stdout.getvalue()[-3000:]
    finally:
        rec["wall_s"] = time.perf_counter() - start
        shutil.rmtree(output, ignore_errors=True)
    diffs = rec.get("max_abs_diff") or {}
    worst = max(diffs.values()) if diffs else None
    status = "ok" if rec["ok"] else f"FAILED: {rec['error']}"
    print(f"[export] Mask R-CNN {args.export_norm} ({args.export_method}): "
          f"{rec.get('detections', '?')} detections, max |exported - eager| "
          f"{_f(worst, '.2e')}, {rec.get('folded_convs', '?')} folded convs: {status}",
          flush=True)
    return rec


# ------------------------------------------------------------------------------- reporting
def environment(args):
    import detectron2

    env = {
        "command": "python tools/gpu_check.py " + " ".join(sys.argv[1:]),
        "python": platform.python_version(), "torch": torch.__version__,
        "torch_cuda": torch.version.cuda, "detectron2": detectron2.__version__,
        "d2_norms": d2_norms.__version__, "device": args.device,
        "D2_NORMS_FRN_IMPL": os.environ.get("D2_NORMS_FRN_IMPL", "auto (unset)"),
        "D2_NORMS_CACHE": os.environ.get("D2_NORMS_CACHE", "(unset: ~/.cache/d2_norms)"),
    }
    if args.device == "cuda":
        props = torch.cuda.get_device_properties(0)
        env.update({"gpu": props.name, "gpu_memory_gib": props.total_memory / 2 ** 30,
                    "capability": f"{props.major}.{props.minor}",
                    "cudnn": torch.backends.cudnn.version()})
    try:
        import torchvision

        env["torchvision"] = torchvision.__version__
    except ImportError:
        pass
    return env


class JsonReport:
    """The ``--json`` file, rewritten (atomically) after every check, so that a run stopped by
    a time limit still leaves what it measured ("passed": null until the end)."""

    def __init__(self, path, env, args, training, frn_kernels, export, layers=(), models=()):
        self.path, self.env, self.args = path, env, args
        self.training, self.frn_kernels, self.export = training, frn_kernels, export
        self.layers, self.models = layers, models

    def write(self, passed=None):
        if not self.path:
            return
        from d2_norms.fileio import atomic_write_text

        atomic_write_text(self.path, json.dumps(_json_safe({
            "environment": self.env, "args": vars(self.args), "training": self.training,
            "frn_kernels": self.frn_kernels, "export": self.export,
            "layers": list(self.layers), "models": list(self.models), "passed": passed}),
            indent=1, allow_nan=False))


def _json_safe(value):
    """Non-finite floats as the strings "nan" / "inf" / "-inf" (strict JSON has no NaN; COCO
    AP is NaN when a model detected nothing, a failed run's loss may be inf)."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def _f(value, fmt):
    return "-" if value is None else format(value, fmt)


def print_timing_summary(layers, models):
    for rec in layers:
        if not rec["ok"]:
            print(f"\n- layer timings FAILED: {rec.get('error')}")
            continue
        ops = rec.get("ops", {})
        print("\n| ops per fwd+bwd (2x64x16x16) | " + " | ".join(ops) + " |")
        print("|---|" + "---:|" * len(ops))
        print("| count | " + " | ".join(str(v) for v in ops.values()) + " |")
        for kind in ("norm", "conv"):
            for dtype in ("fp32", "bf16"):
                rows = [r for r in rec["rows"] if r["kind"] == kind and r["dtype"] == dtype
                        and "ms" in r]
                if not rows:
                    continue
                names = list(dict.fromkeys(r["name"] for r in rows))
                print(f"\n| {kind} {dtype}: ms (ratio{', GB/s' if kind == 'norm' else ''}) | "
                      + " | ".join(names) + " |")
                print("|---|" + "---:|" * len(names))
                for shape in dict.fromkeys(r["shape"] for r in rows):
                    cells = []
                    for n in names:
                        r = next((r for r in rows if r["shape"] == shape and r["name"] == n),
                                 None)
                        if r is None:
                            cells.append("-")
                            continue
                        cell = f"{r['ms']:.3f} ({_f(r['ratio'], '.2f')}x"
                        cell += f", {r['gbps']:.0f})" if r.get("gbps") else ")"
                        cells.append(cell)
                    print(f"| {shape} | " + " | ".join(cells) + " |")
    for rec in models:
        if rec["ok"] is None:
            print(f"\n- models {rec['detector']} {rec['amp']}: skipped ({rec['skipped']})")
            continue
        if not rec["ok"]:
            print(f"\n- models {rec['detector']} {rec['amp']}: FAILED {rec.get('error')}")
            continue
        print(f"\n| {rec['detector']} {rec['size']} px, AMP {rec['amp']} | img | step s/it | "
              "x BN |")
        print("|---|---:|---:|---:|")
        for r in rec["train"]:
            print(f"| {r['norm']} | {r['ims']} | {r['step_ms'] / 1e3:.3f} | "
                  f"{_f(r.get('step_x_bn'), '.3f')} |")
        print("| inference | img | ms | x FrozenBN |")
        for r in rec["inference"]:
            print(f"| {r['model']} | {r['ims']} | {r['ms']:.1f} | "
                  f"{_f(r.get('x_frozen_bn'), '.3f')} |")


def print_summary(train, frn, export, env):
    where = env.get("gpu", env["device"])
    print(f"\n## gpu_check summary ({where}, torch {env['torch']}, detectron2 "
          f"{env['detectron2']})")
    if train:
        print("\n| detector | norm | AMP | status | s/it | peak MiB | loss first -> last | "
              "FRN kernels |")
        print("|:---|:---|:---|:---|---:|---:|:---|:---|")
        for r in train:
            status = {True: "ok", False: "FAILED", None: "skipped"}[r["ok"]]
            loss = (f"{r['first_loss']:.3f} -> {r['last_loss']:.3f}"
                    if r.get("first_loss") is not None else "-")
            print(f"| {DETECTOR_TITLES[r['detector']]} | {r['norm']} | "
                  f"{'on' if r['amp'] else 'off'} | {status} | {_f(r.get('s_per_it'), '.3f')} "
                  f"| {_f(r.get('peak_allocated_mib'), '.0f')} | {loss} | "
                  f"{r.get('frn_impl', '-')} |")
        for r in train:
            if r.get("eval"):
                keys = [k for k in r["eval"] if k.endswith(("/AP", "/AP50"))]
                print(f"- evaluation, {DETECTOR_TITLES[r['detector']]} {r['norm']} after "
                      f"{r['iters']} it: " + ", ".join(f"{k} {r['eval'][k]:.1f}" for k in keys))
        for r in train:
            if r["ok"] is False:
                print(f"- FAILED {DETECTOR_TITLES[r['detector']]} {r['norm']} "
                      f"{'AMP' if r['amp'] else 'fp32'}: {r['error']}")
    if frn:
        print("\n| FRN case | compiled vs eager (rel) | vs float64 (rel) | tolerance | "
              "first compiled call s | status |")
        print("|:---|---:|---:|---:|---:|:---|")
        for r in frn:
            if "shape" not in r and r["ok"]:
                continue
            print(f"| {r['case']} | {_f(r.get('max_compiled_vs_eager_rel'), '.1e')} | "
                  f"{_f(r.get('max_vs_float64_rel'), '.1e')} | {_f(r.get('tolerance_rel'), 'g')}"
                  f" | {_f(r.get('first_compiled_call_s'), '.1f')} | "
                  f"{'ok' if r['ok'] else 'FAILED: ' + r.get('error', '')} |")
    for r in export:
        if r.get("skipped"):
            print(f"\n- export: skipped ({r['skipped']})")
            continue
        diffs = ", ".join(f"{k} {v:.1e}" for k, v in (r.get("max_abs_diff") or {}).items())
        print(f"\n- export, Mask R-CNN R18-FPN {r['norm']} ({r['method']}, "
              f"{r.get('folded_convs', '?')} folded convs, {r.get('detections', '?')} "
              f"detections): max |exported - eager| {diffs or '-'} -> "
              f"{'ok' if r['ok'] else 'FAILED: ' + r.get('error', '')[:300]}")


def main(argv=None):
    args = parse_args(argv)
    level = logging.INFO if args.verbose else logging.WARNING
    from detectron2.utils.logger import setup_logger

    # detectron2's handlers once (the Trainer would add them), at the chosen level: the model
    # printout and per-run INFO lines of 20 runs would bury the summary.
    setup_logger()
    setup_logger(name="d2_norms", abbrev_name="d2n")
    for name in ("detectron2", "d2_norms", "fvcore"):
        logging.getLogger(name).setLevel(level)
    logging.getLogger("d2_norms.gpu_check").setLevel(logging.INFO)

    env = environment(args)
    print("# gpu_check: " + ", ".join(f"{k} {v}" for k, v in env.items()), flush=True)
    device = torch.device(args.device)
    started = time.perf_counter()
    frn_records, train_records, export_records = [], [], []
    layer_records, model_records = [], []
    report = JsonReport(args.json, env, args, train_records, frn_records, export_records,
                        layer_records, model_records)
    if not args.skip_frn_kernels:
        frn_records.extend(check_frn_kernels(device))
        report.write()
    if args.layers == "on":
        layer_records.append(check_layer_timings(device, args))
        report.write()
    if args.models == "on":
        model_records.extend(check_model_timings(device, args, started))
        report.write()
    root = args.output_dir or tempfile.mkdtemp(prefix="d2_norms_gpu_check_")
    try:
        if not args.skip_train:
            run_training(args, root, on_record=lambda rec: (train_records.append(rec),
                                                            report.write()), started=started)
        if args.export_norm != "none" and out_of_time(args, started):
            export_records.append({"check": "export", "norm": args.export_norm, "ok": None,
                                   "skipped": f"--time-budget {args.time_budget:g} s used up"})
            print(f"[export] skipped ({export_records[-1]['skipped']})", flush=True)
        elif args.export_norm != "none":
            weights = next((r["weights"] for r in train_records if "weights" in r), None)
            export_records.append(check_export(args, weights, root))
            report.write()
            if weights and not args.keep_outputs:
                shutil.rmtree(os.path.dirname(weights), ignore_errors=True)
    finally:
        if args.output_dir is None and not args.keep_outputs:
            shutil.rmtree(root, ignore_errors=True)
    from d2_norms.layers import frn as frn_module

    env["frn_compiled_broken"] = frn_module._COMPILED.broken
    env["seconds"] = time.perf_counter() - started
    print_summary(train_records, frn_records, export_records, env)
    print_timing_summary(layer_records, model_records)
    checks = train_records + frn_records + export_records + layer_records + model_records
    failed = [r for r in checks if r["ok"] is False]
    skipped = [r for r in checks if r["ok"] is None]
    verdict = "ALL CHECKS PASSED" if not failed else f"{len(failed)} CHECK(S) FAILED"
    if skipped:
        verdict += f", {len(skipped)} skipped (time budget)"
    print(f"\n{verdict} in {env['seconds']:.0f} s", flush=True)
    report.write(passed=not failed)
    return 0 if not failed else 1


if __name__ == "__main__":
    sys.exit(main())
