#!/usr/bin/env python
"""Signal Propagation Plots (NF paper sec. 3) for any registered d2_norms/detectron2 backbone.

Builds each configured backbone at initialisation, feeds N(0,1) inputs and writes a PNG (three
panels against block depth) and a CSV with the same numbers. Several configs go in one figure:

    python tools/spp.py --config-file configs/spp/nf_r50.yaml configs/spp/nf_r50_he.yaml \
        --output docs/spp_nf.png [KEY VALUE ...]

Trailing KEY VALUE pairs are applied to every config (detectron2 ``opts`` syntax).
"""
import argparse
import os
import sys

import torch

import d2_norms  # noqa: F401  (shims)
from d2_norms.modeling.spp import plot_spp, spp_from_config, write_spp_csv


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config-file", nargs="+", required=True, metavar="YAML",
                   help="one or more configs; each becomes one line in every panel")
    p.add_argument("--labels", nargs="+", default=None,
                   help="legend label per config (default: the YAML file name)")
    p.add_argument("--output", default="output/spp.png",
                   help="PNG path; the CSV is written next to it with a .csv suffix")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--size", type=int, default=224, help="input height = width in pixels")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--logy", choices=["auto", "yes", "no"], default="auto")
    p.add_argument("--title", default="")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("opts", nargs=argparse.REMAINDER, default=[],
                   help="KEY VALUE pairs applied to every config")
    args = p.parse_args(argv)
    # "--config-file a.yaml b.yaml KEY VALUE": nargs="+" also swallows the trailing opts, so
    # everything after the last YAML path is moved back to opts.
    files = list(args.config_file)
    n_yaml = 0
    while n_yaml < len(files) and files[n_yaml].lower().endswith((".yaml", ".yml")):
        n_yaml += 1
    if n_yaml == 0:
        p.error(f"--config-file needs at least one .yaml path, got {files}")
    args.config_file, args.opts = files[:n_yaml], files[n_yaml:] + list(args.opts)
    if args.labels is not None and len(args.labels) != len(args.config_file):
        p.error(f"--labels has {len(args.labels)} names for {len(args.config_file)} configs")
    if len(args.opts) % 2:
        p.error(f"opts must be KEY VALUE pairs, got an odd count: {args.opts}")
    if not args.output.lower().endswith(".png"):
        p.error(f"--output must be a .png path, got {args.output}")
    return args


def load_cfg(path, opts):
    from d2_norms.engine.preflight import load_config

    cfg = load_config(path, list(opts))  # applies MODEL.D2NORMS.NORM where a config has it
    cfg.MODEL.DEVICE = "cpu"
    cfg.freeze()
    return cfg


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    labels = args.labels or [os.path.splitext(os.path.basename(c))[0] for c in args.config_file]
    results = {}
    for label, path in zip(labels, args.config_file):
        if not os.path.isfile(path):
            sys.exit(f"config file not found: {path}")
        cfg = load_cfg(path, args.opts)
        results[label] = spp_from_config(cfg, batch_size=args.batch_size, size=args.size,
                                         seed=args.seed)
        last = results[label][-1]
        print(f"{label}: {len(results[label])} blocks; last block: squared mean "
              f"{last.avg_channel_squared_mean:.4g}, variance {last.avg_channel_variance:.4g}, "
              f"residual variance {last.residual_avg_channel_variance:.4g}")
    csv_path = args.output[:-4] + ".csv"
    write_spp_csv(results, csv_path)
    plot_spp(results, args.output, logy=args.logy, title=args.title)
    print(f"wrote {args.output} and {csv_path}")


if __name__ == "__main__":
    main()
