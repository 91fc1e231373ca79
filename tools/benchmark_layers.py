#!/usr/bin/env python
"""Side by side, in one run: operators per forward+backward, time and saved-for-backward memory
of d2_norms' normalizers and their baselines (issue 22).

Candidates. Norm + activation: BN+ReLU, GN+ReLU (G=32), timm FilterResponseNormTlu2d, d2_norms
FRN+TLU with its eager and its torch.compile kernels (``D2_NORMS_FRN_IMPL``). 3x3 convs C->C:
plain (no bias), d2_norms WS (GNWS) and Scaled WS (NF, with bias and gain), timm StdConv2d and
ScaledStdConv2d.

* **ops**: ``d2_norms.profiling.count_ops`` - top-level aten ops of ``fn(x).sum().backward()``
  on a 2x64x16x16 CPU input, harness included (deterministic; the targets are asserted in
  ``tests/test_op_counts.py``).
* **ms**: forward+backward, median (``--stat min``: best) of ``--reps`` interleaved rounds after
  warm-up (every round runs every candidate once, so load changes hit all alike); ratio
  against GN+ReLU (norms) and the plain conv (convs).
* **GB/s**: the byte floor over the time. Floor = what a fused norm must move: read x twice
  (statistics, output), write y, read dy and x, write dx = 6x the tensor's bytes; a conv's
  floor is not computed (compute-bound).
* **saved**: bytes of unique storages autograd keeps for backward / input bytes.

Dtypes: fp32, and bf16 (norms get bf16 inputs with fp32 parameters, as under AMP; convs run
under ``torch.autocast`` with fp32 weights). Threads: each of ``--threads`` in turn (CPU).

    python tools/benchmark_layers.py --quick            # 2 shapes, fp32, 1 thread, ~1 min
    python tools/benchmark_layers.py                    # issue 22's full table (CPU: long)
    python tools/benchmark_layers.py --device cuda --dtypes fp32 bf16
"""
import argparse
import json
import platform
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

import d2_norms  # noqa: F401
from d2_norms.layers import FilterResponseNorm2d, GroupNorm, ScaledStdConv2d, WSConv2d
from d2_norms.layers import frn as frn_module
from d2_norms.profiling import SavedTensorMeter, count_ops

COUNT_SHAPE = (2, 64, 16, 16)
# today's shapes, the op-count shape, FPN P3 and P2 of an 800x1216 image pair
NORM_SHAPES = ["2x64x16x16", "2x256x64x64", "1x256x100x152", "8x64x56x56", "2x1024x16x16",
               "2x256x100x152", "2x256x200x304"]
CONV_SHAPES = ["2x64x16x16", "2x64x56x56", "2x256x16x16", "2x256x100x152"]
QUICK_NORM_SHAPES = ["2x64x16x16", "2x256x64x64"]
QUICK_CONV_SHAPES = ["2x64x16x16", "2x256x16x16"]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def parse_shape(text):
    try:
        shape = tuple(int(v) for v in text.lower().split("x"))
    except ValueError:
        shape = ()
    if len(shape) != 4 or min(shape) < 1:
        raise argparse.ArgumentTypeError(f"shape must look like 2x256x64x64, got {text!r}")
    return shape


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class frn_kernels:
    """``with frn_kernels(impl):`` FRN's kernels for forward AND backward (None: unchanged)."""

    def __init__(self, impl):
        self.impl = impl

    def __enter__(self):
        self.previous = frn_module._IMPL
        if self.impl is not None:
            frn_module.set_frn_impl(self.impl)

    def __exit__(self, *exc):
        frn_module.set_frn_impl(self.previous)


def with_autocast(fn, device, dtype):
    if dtype is None:
        return fn

    def run(x):
        with torch.autocast(device.type, dtype=dtype):
            return fn(x)
    return run


def norm_candidates(channels, device):
    try:
        from timm.layers import FilterResponseNormTlu2d
    except ImportError:
        FilterResponseNormTlu2d = None
    bn = nn.BatchNorm2d(channels).to(device)
    gn = GroupNorm(channels, num_groups=32).to(device)
    ours = FilterResponseNorm2d(channels, tlu=True).to(device)
    cands = [("BN+ReLU", lambda x: F.relu_(bn(x))), ("GN+ReLU", lambda x: F.relu_(gn(x)))]
    if FilterResponseNormTlu2d is not None:
        cands.append(("timm FRN+TLU", FilterResponseNormTlu2d(channels, eps=1e-6).to(device)))
    cands.append(("FRN+TLU eager", ours))
    if frn_module.frn_compiled_available():
        cands.append(("FRN+TLU compiled", ours))
    return cands


def impl_of(name):
    """The FRN kernels a candidate runs with (None: not an FRN candidate)."""
    return {"FRN+TLU eager": "eager", "FRN+TLU compiled": "compiled"}.get(name)


def conv_candidates(channels, device):
    try:
        from timm.layers import ScaledStdConv2d as TimmScaledStdConv2d
        from timm.layers import StdConv2d
    except ImportError:
        StdConv2d = None
    cands = [
        ("conv plain", nn.Conv2d(channels, channels, 3, padding=1, bias=False).to(device)),
        ("WS conv", WSConv2d(channels, channels, 3).to(device)),
        ("Scaled WS conv", ScaledStdConv2d(channels, channels, 3, gamma="relu").to(device)),
    ]
    if StdConv2d is not None:
        cands.append(("timm StdConv2d", StdConv2d(channels, channels, 3, padding=1,
                                                  eps=1e-6).to(device)))
        cands.append(("timm ScaledStdConv2d",
                      TimmScaledStdConv2d(channels, channels, 3, padding=1, eps=1e-6).to(device)))
    return cands


def op_counts(make_candidates):
    """Every candidate's op count at COUNT_SHAPE (CPU, fp32, one thread)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        counts = {}
        for name, fn in make_candidates(COUNT_SHAPE[1], torch.device("cpu")):
            x = torch.randn(*COUNT_SHAPE, requires_grad=True)
            with frn_kernels(impl_of(name)):
                counts[name] = count_ops(fn, x)[0]
        return counts
    finally:
        torch.set_num_threads(threads)


def time_table(kind, shapes, make_candidates, baseline, dtype_name, args, device):
    """Rows {shape, name, ms, ratio, gbps, saved} for one dtype at the current thread count."""
    dtype = DTYPES[dtype_name]
    rows = []
    for shape in shapes:
        cands = make_candidates(shape[1], device)
        if kind == "conv":
            x = torch.randn(*shape, device=device, requires_grad=True)
            autocast = dtype if dtype != torch.float32 else None
            cands = [(n, with_autocast(f, device, autocast)) for n, f in cands]
        else:
            x = torch.randn(*shape, device=device, dtype=dtype, requires_grad=True)
        grad = torch.randn(*shape, device=device, dtype=dtype)

        def once(name, fn):
            with frn_kernels(impl_of(name)):
                synchronize(device)
                t0 = time.perf_counter()
                out = fn(x)
                out.backward(grad.to(out.dtype))
                synchronize(device)
            x.grad = None
            return time.perf_counter() - t0

        usable = []
        for name, fn in cands:
            try:
                for _ in range(args.warmup):  # also compiles the torch.compile kernels
                    once(name, fn)
                usable.append((name, fn))
            except (RuntimeError, TypeError) as e:  # e.g. a dtype a baseline does not take
                rows.append({"shape": shape, "name": name, "error": str(e).splitlines()[0]})
        times = {name: [] for name, _ in usable}
        reps = max(1, args.reps if x.numel() < 2 ** 24 else args.reps // 2)
        for _ in range(reps):
            for name, fn in usable:
                times[name].append(once(name, fn))
        pick = min if getattr(args, "stat", "median") == "min" else statistics.median
        medians = {name: pick(t) for name, t in times.items()}
        base = medians.get(baseline)
        floor = 6 * x.numel() * x.element_size() if kind == "norm" else None
        for name, fn in usable:
            with SavedTensorMeter() as meter, frn_kernels(impl_of(name)):
                out = fn(x)
            del out
            ms = medians[name] * 1e3
            rows.append({"shape": shape, "name": name, "ms": ms,
                         "ratio": medians[name] / base if base else None,
                         "gbps": floor / medians[name] / 1e9 if floor else None,
                         "saved": meter.total / (x.numel() * x.element_size())})
    return rows


def print_times(title, rows, baseline, names):
    print(f"\n{title} (ms, x {baseline}; norms also GB/s at the 6x-bytes floor)")
    print("| shape | " + " | ".join(names) + " |")
    print("|---|" + "---:|" * len(names))
    shapes = []
    for r in rows:
        if r["shape"] not in shapes:
            shapes.append(r["shape"])
    for shape in shapes:
        cells = []
        for name in names:
            r = next((r for r in rows if r["shape"] == shape and r["name"] == name), None)
            if r is None:
                cells.append("-")
            elif "error" in r:
                cells.append("n/a")
            else:
                cell = f"{r['ms']:.2f} ({r['ratio']:.2f}x)" if r["ratio"] else f"{r['ms']:.2f}"
                if r["gbps"] is not None:
                    cell += f" {r['gbps']:.1f} GB/s"
                cells.append(cell)
        print(f"| {'x'.join(map(str, shape))} | " + " | ".join(cells) + " |", flush=True)
    saved = {}
    for r in rows:
        if "saved" in r:
            saved.setdefault(r["name"], r["saved"])
    print("| saved / input | " + " | ".join(
        f"{saved[n]:.2f}x" if n in saved else "-" for n in names) + " |")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="2 norm and 2 conv shapes, fp32, 1 thread, 5 rounds")
    parser.add_argument("--shapes", nargs="+", type=parse_shape, default=None,
                        help="norm input shapes NxCxHxW (default: %s)" % " ".join(NORM_SHAPES))
    parser.add_argument("--conv-shapes", nargs="+", type=parse_shape, default=None,
                        help="conv input shapes (default: %s)" % " ".join(CONV_SHAPES))
    parser.add_argument("--dtypes", nargs="+", choices=list(DTYPES), default=None,
                        help="default: fp32 bf16 (fp32 with --quick)")
    parser.add_argument("--threads", nargs="+", type=int, default=None,
                        help="CPU thread counts to run at (default: 1 2; 1 with --quick)")
    parser.add_argument("--reps", type=int, default=None, help="rounds (default 10, quick 5)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--stat", default="median", choices=["median", "min"],
                        help="per candidate over the rounds; min is robust to load spikes on "
                             "a shared machine (default median)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--skip-convs", action="store_true")
    parser.add_argument("--skip-norms", action="store_true")
    parser.add_argument("--json", help="also write every number to this file")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda requested but CUDA is not available")
    if args.warmup < 1:
        parser.error("--warmup must be >= 1 (warm-up also triggers compilation)")
    norm_shapes = args.shapes or [parse_shape(s) for s in (
        QUICK_NORM_SHAPES if args.quick else NORM_SHAPES)]
    conv_shapes = args.conv_shapes or [parse_shape(s) for s in (
        QUICK_CONV_SHAPES if args.quick else CONV_SHAPES)]
    dtypes = args.dtypes or (["fp32"] if args.quick else ["fp32", "bf16"])
    threads = args.threads or ([1] if args.quick or device.type == "cuda" else [1, 2])
    args.reps = args.reps or (5 if args.quick else 10)
    if args.reps < 1:
        parser.error("--reps must be >= 1")

    where = (torch.cuda.get_device_name(device) if device.type == "cuda"
             else platform.processor() or platform.machine())
    print(f"torch {torch.__version__}, python {platform.python_version()}, device {device} "
          f"({where}); command: python tools/benchmark_layers.py {' '.join(sys.argv[1:])}")
    report = {"device": str(device), "where": where, "torch": torch.__version__,
              "frn_default_impl": frn_module.get_frn_impl(), "ops": {}, "times": []}

    print(f"\nOperators per forward+backward ({'x'.join(map(str, COUNT_SHAPE))}, CPU, top-level "
          "aten ops of fn(x).sum().backward(), harness included)")
    for kind, make in (("norm", norm_candidates), ("conv", conv_candidates)):
        if (kind == "norm" and args.skip_norms) or (kind == "conv" and args.skip_convs):
            continue
        counts = op_counts(make)
        report["ops"].update(counts)
        print("| " + " | ".join(counts) + " |")
        print("|" + "---:|" * len(counts))
        print("| " + " | ".join(str(v) for v in counts.values()) + " |", flush=True)

    for n_threads in threads:
        if device.type == "cpu":
            torch.set_num_threads(n_threads)
        for dtype_name in dtypes:
            label = f"{dtype_name}, " + (f"{n_threads} thread(s)" if device.type == "cpu"
                                         else where)
            if not args.skip_norms:
                names = [n for n, _ in norm_candidates(64, device)]
                rows = time_table("norm", norm_shapes, norm_candidates, "GN+ReLU", dtype_name,
                                  args, device)
                print_times(f"Norm + activation, {label}", rows, "GN+ReLU", names)
                report["times"] += [dict(r, kind="norm", dtype=dtype_name, threads=n_threads)
                                    for r in rows]
            if not args.skip_convs:
                names = [n for n, _ in conv_candidates(64, device)]
                rows = time_table("conv", conv_shapes, conv_candidates, "conv plain",
                                  dtype_name, args, device)
                print_times(f"3x3 conv C->C, {label}", rows, "conv plain", names)
                report["times"] += [dict(r, kind="conv", dtype=dtype_name, threads=n_threads)
                                    for r in rows]
    if frn_module._COMPILED._fns:
        print(f"\ncompiled FRN graphs per kernel (all shapes, dtypes, threads above): "
              f"{frn_module.frn_compile_cache_sizes()}")
    elif not frn_module.frn_compiled_available():
        print(f"\ntorch.compile unavailable: {frn_module._COMPILED.broken}")
    if args.json:
        for r in report["times"]:
            r["shape"] = "x".join(map(str, r["shape"]))
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
