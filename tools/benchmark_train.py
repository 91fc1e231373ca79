#!/usr/bin/env python
"""Whole-model cost of each normalizer: training-step time, training memory and inference time of
RetinaNet and Mask R-CNN (R-FPN, d2_norms backbones) with BN, GN, GNWS, FRN and NF, at 1/2/4/8
images per GPU, side by side in one run, as ratios against BN.

The models are the ones the COCO-scratch configs train (``configs/COCO-scratch/
<detector>_R_50_FPN_<NORM>_2img.yaml``), fed a fixed synthetic batch (square images, 3 boxes
with masks each). The device is CUDA when available, else CPU; nothing else changes.

Measures (each a median over interleaved rounds: every round runs each normalizer once, so a
shared machine's load changes hit every normalizer alike):

* step: forward + backward + SGD step (d2_norms' optimizer), in ms;
* memory: CUDA - ``torch.cuda.max_memory_allocated`` during a step (weights, gradients and
  optimizer state included); CPU - bytes autograd keeps for backward, counted as unique
  storages seen by ``torch.autograd.graph.saved_tensors_hooks`` (a tensor saved by two ops, or
  saved as two views, counts once), plus the step's peak-RSS growth as a secondary measure
  (Linux ``/proc/self/clear_refs``; allocator caching makes it coarse);
* inference: ``model.eval()`` forward under ``torch.no_grad`` for the same batch, also for the
  deployment forms: the BN model with FrozenBatchNorm2d ("FrozenBN") and the NF / GNWS models
  with their weight standardization folded into plain convs ("NF folded", "GNWS folded").

Every model does the same work apart from its normalizer: the RPN/anchor sampling is seeded
identically, Mask R-CNN's ROI heads train on the same fixed proposals (the RPN still runs and
its losses count), and inference keeps every candidate (score threshold 0), so that an untrained
model's random scores do not change how many boxes the heads and NMS process.

Targets (issue 7): FRN, GN and NF step <= 1.05x BN and memory <= 1.0x BN; NF folded inference
<= 1.0x FrozenBN. The script prints whether each is met, per batch size.

    python tools/benchmark_train.py                 # CPU: 256 px, R50, 1 thread, 3 rounds
    python tools/benchmark_train.py --rounds 5 --threads 2 --detectors retinanet
    python tools/benchmark_train.py --quick         # smoke test (R18, 1-2 images, 1 round)
    python tools/benchmark_train.py --json out.json # also write every number
"""
import argparse
import copy
import json
import os
import platform
import statistics
import sys
import time

import torch

import d2_norms  # noqa: F401  (shims + registrations)
from detectron2.layers import FrozenBatchNorm2d
from detectron2.modeling import build_model
from detectron2.structures import BitMasks, Boxes, Instances
from detectron2.utils.events import EventStorage

from d2_norms.layers import fold_weight_standardization, get_frn_impl
from d2_norms.profiling import SavedTensorMeter
from d2_norms.solver import build_optimizer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NORMS = ("BN", "GN", "GNWS", "FRN", "NF")
DETECTORS = {"retinanet": "RetinaNet", "mask_rcnn": "Mask R-CNN"}
TARGET_NORMS = ("FRN", "GN", "NF")
STEP_TARGET, MEMORY_TARGET, INFERENCE_TARGET = 1.05, 1.0, 1.0


# ------------------------------------------------------------------------------------ set-up
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--detectors", nargs="+", default=list(DETECTORS), choices=list(DETECTORS))
    p.add_argument("--norms", nargs="+", default=list(NORMS), choices=list(NORMS))
    p.add_argument("--ims", nargs="+", type=int, default=[1, 2, 4, 8],
                   help="images per GPU (the batch of one process)")
    p.add_argument("--size", type=int, default=None,
                   help="square image side in px (default: 800 on CUDA, 256 on CPU; RetinaNet "
                        "needs >= 256 for BN at 1 image/GPU: its P7 map must have > 1 value)")
    p.add_argument("--depth", type=int, default=50, choices=[18, 34, 50, 101])
    p.add_argument("--rounds", type=int, default=None,
                   help="timed interleaved rounds (default: 10 on CUDA, 3 on CPU)")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps per model and batch")
    p.add_argument("--threads", type=int, default=1, help="CPU threads (torch.set_num_threads)")
    p.add_argument("--rois-per-image", type=int, default=None,
                   help="Mask R-CNN ROI_HEADS.BATCH_SIZE_PER_IMAGE (default: the config's 512 "
                        "on CUDA, 128 on CPU to keep the run short)")
    p.add_argument("--proposals-test", type=int, default=None,
                   help="Mask R-CNN RPN.POST_NMS_TOPK_TEST (default: the config's 1000 on CUDA, "
                        "100 on CPU: an untrained 4conv1fc box head on 1000 proposals per image "
                        "dominates CPU inference)")
    p.add_argument("--detections", type=int, default=None,
                   help="TEST.DETECTIONS_PER_IMAGE (default: the config's 100 on CUDA, 20 on "
                        "CPU: Mask R-CNN's mask head runs on every detection)")
    p.add_argument("--quick", action="store_true",
                   help="smoke test: R18, 128 px, 2 images, 1 round")
    p.add_argument("--amp", default="off", choices=["off", "bf16", "fp16"],
                   help="run forward passes under torch.autocast in this dtype (AMP; fp16 "
                        "needs CUDA)")
    p.add_argument("--json", help="write all measurements to this file")
    args = p.parse_args(argv)
    cuda = torch.cuda.is_available()
    if args.amp == "fp16" and not cuda:
        p.error("--amp fp16 needs CUDA (CPU autocast: --amp bf16)")
    if args.quick:
        args.depth, args.ims, args.rounds, args.warmup = 18, [2], 1, 1
        args.size = args.size or 128
        args.rois_per_image = args.rois_per_image or 32
        args.proposals_test = args.proposals_test or 50
        args.detections = args.detections or 10
    args.size = args.size or (800 if cuda else 256)
    if not cuda:
        args.proposals_test = args.proposals_test or 100
        args.detections = args.detections or 20
    args.rounds = args.rounds or (10 if cuda else 3)
    if args.rois_per_image is None and not cuda:
        args.rois_per_image = 128
    if "BN" not in args.norms:
        args.norms = ["BN"] + args.norms  # the reference of every ratio
    return args


def make_cfg(detector, norm, args, device):
    from d2_norms.engine.preflight import load_config

    depth = 50 if args.depth in (18, 34, 50) else args.depth
    # load_config applies the cell's MODEL.D2NORMS.NORM (the one field) to every part
    cfg = load_config(os.path.join(REPO, "configs", "COCO-scratch",
                                   f"{detector}_R_{depth}_FPN_{norm}_2img.yaml"), [])
    cfg.MODEL.DEVICE = device.type
    cfg.MODEL.RESNETS.DEPTH = args.depth
    if args.depth in (18, 34):
        cfg.MODEL.RESNETS.RES2_OUT_CHANNELS = 64
    cfg.MODEL.RETINANET.NUM_CLASSES = cfg.MODEL.ROI_HEADS.NUM_CLASSES = 3
    if args.rois_per_image:
        cfg.MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE = args.rois_per_image
    if args.proposals_test:
        cfg.MODEL.RPN.POST_NMS_TOPK_TEST = args.proposals_test
    if args.detections:
        cfg.TEST.DETECTIONS_PER_IMAGE = args.detections
    cfg.INPUT.MIN_SIZE_TEST = cfg.INPUT.MAX_SIZE_TEST = args.size
    # Same amount of post-processing for every model: keep every candidate above score 0 (an
    # untrained model's scores would otherwise decide how many boxes NMS / the mask head see).
    cfg.MODEL.RETINANET.SCORE_THRESH_TEST = 0.0
    cfg.MODEL.ROI_HEADS.SCORE_THRESH_TEST = 0.0
    cfg.SOLVER.BASE_LR = 1e-4  # small: the weights barely move between timed steps
    return cfg


def make_batch(n, size, device, seed=0):
    """n square images with 3 boxes (and box-shaped masks) each, fixed by ``seed``."""
    g = torch.Generator().manual_seed(seed)
    batch = []
    for _ in range(n):
        corners = torch.rand(3, 2, 2, generator=g) * size
        lo, hi = corners.min(dim=1).values, corners.max(dim=1).values
        hi = torch.maximum(hi, lo + size / 8).clamp(max=size)
        boxes = torch.cat([lo, hi], dim=1)
        masks = torch.zeros(3, size, size, dtype=torch.bool)
        for m, (x0, y0, x1, y1) in zip(masks, boxes.round().int().tolist()):
            m[y0:y1, x0:x1] = True
        inst = Instances((size, size), gt_boxes=Boxes(boxes), gt_masks=BitMasks(masks),
                         gt_classes=torch.tensor([0, 1, 2]))
        image = torch.randint(0, 256, (3, size, size), generator=g).float()
        batch.append({"image": image.to(device), "instances": inst.to(device),
                      "height": size, "width": size})
    return batch


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ------------------------------------------------------------------------------ measurements
def _rss_kib(field):
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _malloc_trim():
    """Give the C allocator's free memory back to the OS, so that RSS growth during the next
    step measures what the step allocates rather than what earlier steps left cached."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def reset_peak_rss() -> bool:
    _malloc_trim()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS
        return True
    except OSError:
        return False


def fixed_proposals(batch, count, seed=0):
    """Per image ``count`` proposals: a quarter jittered ground-truth boxes, the rest random."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for d in batch:
        inst = d["instances"]
        h, w = inst.image_size
        gt = inst.gt_boxes.tensor.cpu()
        n_near = count // 4
        near = gt[torch.randint(len(gt), (n_near,), generator=g)]
        near = near + (torch.rand(n_near, 4, generator=g) - 0.5) * 0.2 * (near[:, 2:] -
                                                                          near[:, :2]).repeat(1, 2)
        xy = torch.rand(count - n_near, 2, generator=g) * torch.tensor([w, h]) * 0.8
        wh = (torch.rand(count - n_near, 2, generator=g) * 0.5 + 0.05) * torch.tensor([w, h])
        rand = torch.cat([xy, xy + wh], dim=1)
        boxes = Boxes(torch.cat([near, rand]).to(inst.gt_boxes.device))
        boxes.clip((h, w))
        out.append(Instances((h, w), proposal_boxes=boxes,
                             objectness_logits=torch.zeros(count, device=boxes.device)))
    return out


def fix_training_proposals(model, proposals):
    """Mask R-CNN: the RPN runs (its cost and losses count) but the ROI heads train on the same
    fixed proposals for every model, so that the number of positive ROIs - and with it the
    mask head's work - does not depend on a model's random initial predictions."""
    rpn = model.proposal_generator
    original = rpn.forward

    def forward(images, features, gt_instances=None):
        found, losses = original(images, features, gt_instances)
        if rpn.training and len(found) == len(proposals[0]):
            return [copy.copy(p) for p in proposals[1]], losses
        return found, losses

    rpn.forward = forward
    return proposals


def _autocast(device, amp):
    """torch.autocast for ``--amp`` (a no-op context for "off")."""
    import contextlib

    if amp in (None, "off"):
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype={"bf16": torch.bfloat16,
                                              "fp16": torch.float16}[amp])


class Candidate:
    amp = "off"  # set from --amp by build_candidates

    def __init__(self, name, model, device, train=True):
        self.name = name
        self.model = model
        self.device = device
        self.optimizer = None
        self.train = train
        self.fixed = None  # [batch, proposals] used by fix_training_proposals
        self._proposal_cache = {}

    def fix_proposals(self, count):
        self.fixed = [[], []]
        self.proposal_count = count
        fix_training_proposals(self.model, self.fixed)

    def proposals_for(self, batch):
        key = (len(batch), id(batch))
        if key not in self._proposal_cache:
            self._proposal_cache[key] = fixed_proposals(batch, self.proposal_count)
        return self._proposal_cache[key]

    def step(self, batch):
        self.model.train()
        torch.manual_seed(0)  # the same ROI / anchor sampling in every model
        if self.fixed is not None:
            self.fixed[0], self.fixed[1] = batch, self.proposals_for(batch)
        with EventStorage(0), _autocast(self.device, self.amp):
            losses = self.model(batch)
        loss = sum(v.float() for v in losses.values())
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return loss

    def timed_step(self, batch):
        synchronize(self.device)
        t0 = time.perf_counter()
        self.step(batch)
        synchronize(self.device)
        return time.perf_counter() - t0

    def memory_step(self, batch):
        """(memory in bytes, peak RSS growth in bytes or None) of one training step."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.step(batch)
            torch.cuda.synchronize(self.device)
            return torch.cuda.max_memory_allocated(self.device), None
        rss0 = _rss_kib("VmRSS") if reset_peak_rss() else None
        self.model.train()
        torch.manual_seed(0)
        if self.fixed is not None:
            self.fixed[0], self.fixed[1] = batch, self.proposals_for(batch)
        meter = SavedTensorMeter()
        with EventStorage(0), meter, _autocast(self.device, self.amp):
            losses = self.model(batch)
        loss = sum(v.float() for v in losses.values())
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        peak = _rss_kib("VmHWM")
        return meter.total, None if rss0 is None or peak is None else (peak - rss0) * 1024

    def timed_inference(self, images):
        self.model.eval()
        synchronize(self.device)
        t0 = time.perf_counter()
        with torch.no_grad(), _autocast(self.device, self.amp):
            self.model(images)
        synchronize(self.device)
        return time.perf_counter() - t0


def build_candidates(detector, args, device):
    Candidate.amp = getattr(args, "amp", "off")
    train, infer = {}, {}
    for norm in args.norms:
        cfg = make_cfg(detector, norm, args, device)
        torch.manual_seed(0)
        model = build_model(cfg)
        cand = Candidate(norm, model, device)
        cand.optimizer = build_optimizer(cfg, model)
        if detector == "mask_rcnn":
            cand.fix_proposals(cfg.MODEL.RPN.POST_NMS_TOPK_TRAIN)
        train[norm] = cand
        infer[norm] = Candidate(norm, model, device)
        if norm == "BN":
            # .to(device): detectron2 creates the FrozenBN buffers of a non-affine BN (the
            # RetinaNet head's per-level BNs) on the CPU.
            frozen = FrozenBatchNorm2d.convert_frozen_batchnorm(copy.deepcopy(model)).to(device)
            infer["FrozenBN"] = Candidate("FrozenBN", frozen, device)
        if norm in ("NF", "GNWS"):
            folded = fold_weight_standardization(copy.deepcopy(model).eval())
            infer[f"{norm} folded"] = Candidate(f"{norm} folded", folded, device)
    return train, infer


def interleaved(cands, fn, rounds, warmup):
    """{name: [seconds]} running fn(candidate) round-robin, rotating the order every round."""
    names = list(cands)
    for _ in range(warmup):
        for name in names:
            fn(cands[name])
    times = {name: [] for name in names}
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            times[name].append(fn(cands[name]))
    return times


def check_folding(infer, images):
    """Largest |difference| between each model and its folded form (same outputs expected)."""
    out = {}
    for base in ("NF", "GNWS"):
        if base in infer and f"{base} folded" in infer:
            a, b = infer[base].model, infer[f"{base} folded"].model
            a.eval()
            b.eval()
            x = a.preprocess_image(images).tensor
            with torch.no_grad():
                fa, fb = a.backbone(x), b.backbone(x)
            out[base] = max(float((fa[k] - fb[k]).abs().max() / (fa[k].abs().max() + 1e-12))
                            for k in fa)
    return out


def run_detector(detector, args, device):
    train, infer = build_candidates(detector, args, device)
    rows, inference_rows = [], []
    fold_error = None
    for ims in args.ims:
        batch = make_batch(ims, args.size, device, seed=ims)
        images = [{k: v for k, v in d.items() if k != "instances"} for d in batch]
        if fold_error is None:
            fold_error = check_folding(infer, images)
        # warm-up (first calls, FRN's kernel compilation) once per model, at the first size
        warmup = args.warmup if ims == args.ims[0] else 0
        times = interleaved(train, lambda c: c.timed_step(batch), args.rounds, warmup)
        memory = {name: c.memory_step(batch) for name, c in train.items()}
        for name in train:
            rows.append({"ims": ims, "norm": name,
                         "step_ms": 1000 * statistics.median(times[name]),
                         "step_ms_all": [1000 * t for t in times[name]],
                         "memory_bytes": memory[name][0], "peak_rss_bytes": memory[name][1]})
        inf_times = interleaved(infer, lambda c: c.timed_inference(images), args.rounds,
                                warmup)
        for name in infer:
            inference_rows.append({"ims": ims, "model": name,
                                   "ms": 1000 * statistics.median(inf_times[name]),
                                   "ms_all": [1000 * t for t in inf_times[name]]})
        if device.type == "cuda":
            torch.cuda.empty_cache()
    add_ratios(rows, inference_rows)
    return {"detector": detector, "train": rows, "inference": inference_rows,
            "fold_max_rel_diff": fold_error}


def _ratio(a, b):
    return None if a is None or not b else a / b


def add_ratios(rows, inference_rows):
    for r in rows:
        bn = next(x for x in rows if x["ims"] == r["ims"] and x["norm"] == "BN")
        r["step_x_bn"] = _ratio(r["step_ms"], bn["step_ms"])
        r["memory_x_bn"] = _ratio(r["memory_bytes"], bn["memory_bytes"])
        ok = (bn["peak_rss_bytes"] or 0) > 0 and r["peak_rss_bytes"] is not None
        r["rss_x_bn"] = _ratio(r["peak_rss_bytes"], bn["peak_rss_bytes"]) if ok else None
    for r in inference_rows:
        same = [x for x in inference_rows if x["ims"] == r["ims"]]
        bn = next(x for x in same if x["model"] == "BN")
        frozen = next((x for x in same if x["model"] == "FrozenBN"), None)
        r["x_bn"] = _ratio(r["ms"], bn["ms"])
        r["x_frozen_bn"] = _ratio(r["ms"], frozen["ms"]) if frozen else None


# ------------------------------------------------------------------------------------ output
def _f(value, fmt):
    return "-" if value is None else format(value, fmt)


def print_tables(result, args, device, memory_label):
    title = DETECTORS[result["detector"]]
    where = device_text(device, args)
    print(f"\n### {title} R{args.depth}-FPN, {args.size}x{args.size} px, {where}")
    print(f"\nTraining step (median of {args.rounds} interleaved rounds) and memory\n")
    print(f"| img/GPU | norm | step ms | step x BN | {memory_label} MB | memory x BN "
          "| peak RSS MB | RSS x BN |")
    print("|---:|:---|---:|---:|---:|---:|---:|---:|")
    for r in result["train"]:
        rss = None if r["peak_rss_bytes"] is None else r["peak_rss_bytes"] / 2 ** 20
        print(f"| {r['ims']} | {r['norm']} | {r['step_ms']:.1f} | {r['step_x_bn']:.3f} | "
              f"{r['memory_bytes'] / 2 ** 20:.1f} | {r['memory_x_bn']:.3f} | {_f(rss, '.1f')} | "
              f"{_f(r['rss_x_bn'], '.3f')} |")
    print(f"\nInference (eval, no grad; median of {args.rounds} interleaved rounds)\n")
    print("| img/GPU | model | ms | x BN | x FrozenBN |")
    print("|---:|:---|---:|---:|---:|")
    for r in result["inference"]:
        print(f"| {r['ims']} | {r['model']} | {r['ms']:.1f} | {r['x_bn']:.3f} | "
              f"{_f(r['x_frozen_bn'], '.3f')} |")
    if result["fold_max_rel_diff"]:
        diffs = ", ".join(f"{k} {v:.1e}" for k, v in result["fold_max_rel_diff"].items())
        print(f"\nfolded vs unfolded backbone outputs, max relative difference: {diffs}")


def target_lines(results):
    lines = []
    for res in results:
        title = DETECTORS[res["detector"]]
        for norm in TARGET_NORMS:
            rows = [r for r in res["train"] if r["norm"] == norm]
            if not rows:
                continue
            steps = [r["step_x_bn"] for r in rows]
            mems = [r["memory_x_bn"] for r in rows]
            lines.append(_target(f"{title} {norm} step <= {STEP_TARGET:.2f}x BN", steps,
                                 STEP_TARGET, rows))
            lines.append(_target(f"{title} {norm} memory <= {MEMORY_TARGET:.2f}x BN", mems,
                                 MEMORY_TARGET, rows))
        nf = [r for r in res["inference"] if r["model"] == "NF folded"]
        if nf:
            lines.append(_target(f"{title} NF folded inference <= {INFERENCE_TARGET:.2f}x "
                                 "FrozenBN", [r["x_frozen_bn"] for r in nf], INFERENCE_TARGET,
                                 nf))
    return lines


def _target(label, values, limit, rows):
    per = ", ".join(f"{r['ims']} img {v:.3f}" for r, v in zip(rows, values))
    met = all(v is not None and v <= limit for v in values)
    return f"- {label}: {per} -> {'met' if met else 'NOT met'}"


def device_text(device, args):
    if device.type == "cuda":
        return f"CUDA {torch.cuda.get_device_name(device)}"
    return f"CPU ({args.threads} thread{'s' if args.threads > 1 else ''})"


def environment(args, device):
    import detectron2

    return {
        "command": "python tools/benchmark_train.py " + " ".join(sys.argv[1:]),
        "device": device_text(device, args),
        "cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
        "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None,
        "python": platform.python_version(), "torch": torch.__version__,
        "detectron2": detectron2.__version__, "d2_norms": d2_norms.__version__,
        "frn_impl": get_frn_impl(), "amp": getattr(args, "amp", "off"),
    }


def main(argv=None):
    args = parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    env = environment(args, device)
    memory_label = "peak allocated" if device.type == "cuda" else "saved-for-backward"
    print("# benchmark_train: whole-model step / memory / inference per normalizer")
    for key, value in env.items():
        print(f"- {key}: {value}")
    print(f"- settings: {args.size}px, images/GPU {args.ims}, norms {args.norms}, "
          f"R{args.depth}, rounds {args.rounds}, warm-up {args.warmup}, Mask R-CNN ROIs/image "
          f"{args.rois_per_image or 'config'}, test proposals {args.proposals_test or 'config'}, "
          f"detections/image {args.detections or 'config'}")
    results = []
    for detector in args.detectors:
        start = time.time()
        res = run_detector(detector, args, device)
        res["seconds"] = time.time() - start
        results.append(res)
        print_tables(res, args, device, memory_label)
    print("\n### Targets\n")
    for line in target_lines(results):
        print(line)
    env["load_average_end"] = os.getloadavg() if hasattr(os, "getloadavg") else None
    print(f"\n- load average at the end: {env['load_average_end']}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"environment": env, "args": vars(args), "results": results}, f, indent=1)
    return results


if __name__ == "__main__":
    main()
