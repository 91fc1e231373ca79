#!/usr/bin/env python
"""Side-by-side time and saved-for-backward memory of d2_norms' layers and their baselines.

For each input shape, prints forward+backward time (median of --reps timed runs after warm-up)
and the bytes autograd keeps for backward (unique storages seen by
``torch.autograd.graph.saved_tensors_hooks``, as a multiple of the input's bytes) for:

  BN+ReLU, GN+ReLU (G=32), timm FilterResponseNormTlu2d, d2_norms FRN+TLU (eager kernels),
  d2_norms FRN+TLU (torch.compile kernels), and 3x3 convs: plain, WS (GN+WS) and Scaled WS (NF).

Ratios are against GN+ReLU (norms) and the plain conv (convs). The issue's targets for
d2_norms FRN+TLU: time <= 1.5x GN+ReLU, saved bytes <= 1.0x the input.

    python tools/benchmark_layers.py                    # default shapes, CPU
    python tools/benchmark_layers.py --shapes 2x256x64x64 --reps 20 --device cuda
"""
import argparse
import platform
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn


import d2_norms  # noqa: E402,F401
from d2_norms.layers import (FilterResponseNorm2d, GroupNorm, ScaledStdConv2d,  # noqa: E402
                             WSConv2d)
from d2_norms.layers import frn as frn_module  # noqa: E402

DEFAULT_NORM_SHAPES = ["2x256x64x64", "1x256x100x152", "8x64x56x56", "2x1024x16x16"]
DEFAULT_CONV_SHAPES = ["2x64x56x56", "2x256x16x16"]


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


def fwd_bwd_once(fn, x, grad, device):
    synchronize(device)
    t0 = time.perf_counter()
    out = fn(x)
    out.backward(grad)
    synchronize(device)
    x.grad = None
    return time.perf_counter() - t0


def saved_bytes(fn, x):
    storages = {}

    def pack(t):
        st = t.untyped_storage()
        storages[(st.data_ptr(), st.device)] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn(x)
    del out
    return sum(storages.values())


def norm_candidates(channels, device):
    try:
        from timm.layers import FilterResponseNormTlu2d
    except ImportError:
        FilterResponseNormTlu2d = None

    bn = nn.BatchNorm2d(channels).to(device)
    gn = GroupNorm(channels, num_groups=32).to(device)
    ours = FilterResponseNorm2d(channels, tlu=True).to(device)
    cands = [
        ("BN+ReLU", lambda x: F.relu_(bn(x)), None),
        ("GN+ReLU", lambda x: F.relu_(gn(x)), None),
    ]
    if FilterResponseNormTlu2d is not None:
        timm_frn = FilterResponseNormTlu2d(channels, eps=1e-6).to(device)
        cands.append(("timm FRN+TLU", timm_frn, None))
    cands.append(("d2_norms FRN+TLU eager", ours, "eager"))
    cands.append(("d2_norms FRN+TLU compiled", ours, "compiled"))
    return cands


def conv_candidates(channels, device):
    plain = nn.Conv2d(channels, channels, 3, padding=1, bias=False).to(device)
    ws = WSConv2d(channels, channels, 3).to(device)
    sws = ScaledStdConv2d(channels, channels, 3, gamma="relu").to(device)
    return [("conv3x3 plain", plain, None), ("conv3x3 WS", ws, None),
            ("conv3x3 Scaled WS", sws, None)]


def run_table(title, shapes, make_candidates, baseline, args, device):
    print(f"\n{title}")
    header = f"{'shape':>16s}  {'layer':26s} {'ms':>9s} {'x ' + baseline:>14s} {'saved/input':>12s}"
    print(header)
    print("-" * len(header))
    previous_impl = frn_module._IMPL
    for shape in shapes:
        x = torch.randn(*shape, device=device, requires_grad=True)
        grad = torch.randn(*shape, device=device)
        cands = []
        for name, fn, impl in make_candidates(shape[1], device):
            if impl == "compiled" and not frn_module.frn_compiled_available():
                cands.append((name, None, impl))
            else:
                cands.append((name, fn, impl))

        def timed(name, fn, impl):
            if impl is not None:
                frn_module.set_frn_impl(impl)
            try:
                return fwd_bwd_once(fn, x, grad, device)
            finally:
                frn_module.set_frn_impl(previous_impl)

        for _ in range(args.warmup):  # also compiles the torch.compile kernels
            for name, fn, impl in cands:
                if fn is not None:
                    timed(name, fn, impl)
        # Interleaved rounds: on a shared machine, load changes hit every candidate alike.
        times = {name: [] for name, _, _ in cands}
        for _ in range(args.reps):
            for name, fn, impl in cands:
                if fn is not None:
                    times[name].append(timed(name, fn, impl))
        rows = []
        for name, fn, impl in cands:
            if fn is None:
                rows.append((name, None, None))
                continue
            if impl is not None:
                frn_module.set_frn_impl(impl)
            ratio = saved_bytes(fn, x) / (x.numel() * x.element_size())
            frn_module.set_frn_impl(previous_impl)
            rows.append((name, statistics.median(times[name]) * 1e3, ratio))
        base = dict((r[0], r[1]) for r in rows).get(baseline)
        shape_s = "x".join(map(str, shape))
        for name, ms, ratio in rows:
            if ms is None:
                print(f"{shape_s:>16s}  {name:26s} {'n/a (torch.compile unavailable)':>37s}")
                continue
            rel = f"{ms / base:.2f}x" if base else "-"
            print(f"{shape_s:>16s}  {name:26s} {ms:9.2f} {rel:>14s} {ratio:11.2f}x", flush=True)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shapes", nargs="+", type=parse_shape, default=None,
                        help="norm input shapes NxCxHxW (default: %s)"
                        % " ".join(DEFAULT_NORM_SHAPES))
    parser.add_argument("--conv-shapes", nargs="+", type=parse_shape, default=None,
                        help="conv input shapes (default: %s)"
                        % " ".join(DEFAULT_CONV_SHAPES))
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--skip-convs", action="store_true")
    args = parser.parse_args(argv)
    if args.reps < 1 or args.warmup < 1:
        parser.error("--reps and --warmup must be >= 1 (warm-up also triggers compilation)")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda requested but CUDA is not available")
    if args.threads:
        torch.set_num_threads(args.threads)
    norm_shapes = args.shapes or [parse_shape(s) for s in DEFAULT_NORM_SHAPES]
    conv_shapes = args.conv_shapes or [parse_shape(s) for s in DEFAULT_CONV_SHAPES]

    print(f"torch {torch.__version__}, python {platform.python_version()}, device {device}"
          + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else
             f" ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"))
    print(f"fp32, forward+backward, median of {args.reps} interleaved rounds after {args.warmup} "
          "warm-up rounds; saved = unique storages kept for backward / input bytes")
    run_table("Normalization + activation", norm_shapes, norm_candidates, "GN+ReLU", args, device)
    if not args.skip_convs:
        run_table("3x3 convolution C->C", conv_shapes, conv_candidates, "conv3x3 plain", args,
                  device)
    if frn_module.frn_compiled_available():
        print(f"\ncompiled FRN graphs per kernel (all shapes above): "
              f"{frn_module.frn_compile_cache_sizes()}")
    else:
        print(f"\ntorch.compile unavailable: {frn_module._COMPILED.broken}")


if __name__ == "__main__":
    main()
