#!/usr/bin/env python
"""Time COCO evaluation end to end through d2_norms' evaluator: faster-coco-eval vs pycocotools.

    python tools/benchmark_eval.py                      # COCO-sized: 5000 images x 100 boxes
    python tools/benchmark_eval.py --images 300 --tasks bbox segm --height 240 --width 320

A generated COCO-like case (80 categories, ~7 objects per image in all area ranges, detections
that are noisy copies of the objects plus background boxes) is registered as a dataset; for each
backend the evaluator from ``build_evaluator`` consumes the model-format outputs (``Instances``)
image by image (``process``) and computes AP (``evaluate``). Building the outputs is the model's
work and is not timed. Prints the times side by side, the ratio, and whether the six COCO metrics
agree (to 1e-4, 0-100 scale).
"""
import argparse
import gc
import os
import sys
import tempfile
import time

import d2_norms  # noqa: F401  (shims before detectron2)

import torch
from detectron2.config import get_cfg
from detectron2.data import MetadataCatalog

from d2_norms.config import add_d2_norms_config
from d2_norms.evaluation import build_evaluator
from d2_norms.evaluation.backends import BACKENDS, COCO_METRICS, backend_available, metrics_close

# The generated COCO case is test-fixture code kept out of the package, in tests/coco_cases.py
# (the backend equivalence tests use the same cases).
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "tests"))
from coco_cases import make_coco_case, register_case, to_instances  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--images", type=int, default=5000, help="images (COCO val2017: 5000)")
    p.add_argument("--dets", type=int, default=100, help="detections per image (COCO limit: 100)")
    p.add_argument("--categories", type=int, default=80)
    p.add_argument("--tasks", nargs="+", default=["bbox"], choices=["bbox", "segm"])
    p.add_argument("--height", type=int, default=480)
    p.add_argument("--width", type=int, default=640)
    p.add_argument("--backends", nargs="+", default=list(BACKENDS), choices=list(BACKENDS))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--repeat", type=int, default=1,
                   help="runs per backend, alternating; the fastest run of each is reported "
                        "(other jobs on the machine only ever slow a run down)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (the evaluators are single-threaded apart from "
                        "faster-coco-eval's mask IoU pool)")
    return p.parse_args(argv)


def run_backend(backend: str, case, dataset: str, tasks, outputs):
    cfg = get_cfg()
    add_d2_norms_config(cfg)
    cfg.MODEL.MASK_ON = "segm" in tasks
    cfg.D2NORMS.EVAL.BACKEND = backend
    cfg.D2NORMS.EVAL.DUMP_PREDICTIONS = False
    evaluator = build_evaluator(cfg, dataset, output_dir=None)
    contiguous = MetadataCatalog.get(dataset).thing_dataset_id_to_contiguous_id
    evaluator.reset()
    wall = cpu = 0.0
    for det, out in zip(case.detections, outputs):
        if out is None:  # masks are built per image (too large to hold 5k images of them)
            out = {"instances": to_instances(det, contiguous, case)}
        inputs = [{"image_id": det.image_id, "height": det.height, "width": det.width}]
        t0, c0 = time.perf_counter(), time.process_time()
        evaluator.process(inputs, [out])
        wall += time.perf_counter() - t0
        cpu += time.process_time() - c0
    gc.collect()
    t0, c0 = time.perf_counter(), time.process_time()
    results = evaluator.evaluate()
    return (wall, time.perf_counter() - t0), (cpu, time.process_time() - c0), results


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    missing = [b for b in args.backends if not backend_available(b)]
    if missing:
        print(f"not installed: {missing}", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    case = make_coco_case(args.images, args.dets, num_categories=args.categories,
                          with_masks="segm" in args.tasks, seed=args.seed,
                          image_size=(args.height, args.width))
    n_gt = len(case.gt["annotations"])
    print(f"case: {args.images} images, {args.dets} detections/image "
          f"({args.images * args.dets} in all), {n_gt} ground-truth objects, {args.categories} "
          f"categories, {args.height}x{args.width} px, tasks {args.tasks} "
          f"(generated in {time.perf_counter() - t0:.1f}s)")
    with tempfile.TemporaryDirectory() as tmpdir:
        dataset = f"d2norms_eval_benchmark_{args.images}"
        register_case(case, dataset, tmpdir)
        contiguous = MetadataCatalog.get(dataset).thing_dataset_id_to_contiguous_id
        if "segm" in args.tasks:
            outputs = [None] * len(case.detections)
        else:
            outputs = [{"instances": to_instances(d, contiguous)} for d in case.detections]
        wall, cpu, results = {}, {}, {}
        for _ in range(max(1, args.repeat)):
            for backend in args.backends:
                w, c, results[backend] = run_backend(backend, case, dataset, args.tasks, outputs)
                print(f"  {backend:<17} process {w[0]:7.2f}s  evaluate {w[1]:7.2f}s  total "
                      f"{sum(w):7.2f}s wall ({sum(c):7.2f}s CPU)  " +
                      "  ".join(f"{t} AP {results[backend][t]['AP']:.4f}" for t in args.tasks),
                      flush=True)
                if backend not in wall or sum(w) < sum(wall[backend]):
                    wall[backend] = w
                if backend not in cpu or sum(c) < sum(cpu[backend]):
                    cpu[backend] = c

    print(f"\nfastest of {max(1, args.repeat)} run(s) per backend:")
    print("| backend | process (s) | evaluate (s) | total wall (s) | total CPU (s) |")
    print("|---|---:|---:|---:|---:|")
    for backend in wall:
        print(f"| {backend} | {wall[backend][0]:.2f} | {wall[backend][1]:.2f} | "
              f"{sum(wall[backend]):.2f} | {sum(cpu[backend]):.2f} |")
    if len(wall) == 2:
        fast, ref = "faster_coco_eval", "pycocotools"
        agree = all(metrics_close(results[fast][t], results[ref][t], 1e-4) for t in args.tasks)
        worst = max(abs(results[fast][t][m] - results[ref][t][m])
                    for t in args.tasks for m in COCO_METRICS)
        # CPU time (all threads of the process) is less disturbed than wall time when other
        # jobs share the cores; both are printed.
        print(f"\nspeed-up pycocotools / faster_coco_eval, end to end (process + evaluate): "
              f"{sum(wall[ref]) / sum(wall[fast]):.1f}x wall, "
              f"{sum(cpu[ref]) / sum(cpu[fast]):.1f}x CPU; evaluate alone "
              f"{wall[ref][1] / wall[fast][1]:.1f}x wall")
        print(f"metrics agree to 1e-4: {agree} (largest difference {worst:.2e})")
        return 0 if agree else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
