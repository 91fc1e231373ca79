#!/usr/bin/env python
"""Reproduce a paper's table with one command: train every run of it, then print the AP table.

    python tools/reproduce.py frn-table6 --num-gpus 8      # FRN paper Table 6 (27 RetinaNet runs)
    python tools/reproduce.py gn-table7 --num-gpus 8       # GN paper Table 7 (2 Mask R-CNN runs)
    python tools/reproduce.py frn-table6 --dry-run         # only print the commands

frn-table6 trains each of its 9 cells at the paper's three base lrs (0.01, 0.05, 0.1; sec. 4.3
reports the best); the AP table then shows the best run per cell, labelled "best of lr sweep".
gn-table7 trains single-scale (800, max 1333) as the paper's Detectron config.
Runs go to output/COCO-scratch/<config name>; a finished run (run_status.json "finished") is
skipped and an interrupted one is resumed, so the command can simply be started again.
Needs COCO under $DETECTRON2_DATASETS. Other GPU counts keep the images per GPU and rescale lr
and iterations (see d2_norms/recipes.py).
"""
import argparse
import json
import os
import shlex
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from d2_norms.recipes import PAPER_TABLES, config_name  # noqa: E402


def run_dir(name: str) -> str:
    return os.path.join(REPO, "output", "COCO-scratch", name[: -len(".yaml")])


def state_of(directory: str) -> str:
    try:
        with open(os.path.join(directory, "run_status.json")) as f:
            return json.load(f).get("state", "unknown")
    except (OSError, ValueError):
        return "new"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("table", choices=sorted(PAPER_TABLES))
    parser.add_argument("--num-gpus", type=int, default=8)
    parser.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    parser.add_argument("opts", nargs="*", help="config overrides for every run: KEY VALUE ...")
    args = parser.parse_intermixed_args(argv)

    dirs = []
    for cell in PAPER_TABLES[args.table]:
        name = config_name(*cell)
        out = run_dir(name)
        dirs.append(out)
        cmd = [sys.executable, os.path.join(REPO, "tools", "train_net.py"),
               "--num-gpus", str(args.num_gpus),
               "--config-file", os.path.join(REPO, "configs", "COCO-scratch", name)]
        state = state_of(out)
        if state == "finished":
            print(f"[done]   {name}")
            continue
        if state in ("running", "failed"):
            cmd.append("--resume")
        cmd += ["OUTPUT_DIR", out, *args.opts]
        print(("[dry-run] " if args.dry_run else "[train]  ") + shlex.join(cmd), flush=True)
        if not args.dry_run:
            code = subprocess.call(cmd)
            if code != 0:
                print(f"error: {name} failed (exit {code}); fix it and run this command again "
                      "to resume", file=sys.stderr)
                return code
    table = [sys.executable, os.path.join(REPO, "tools", "ap_table.py"), "--paper", *dirs]
    print(("[dry-run] " if args.dry_run else "") + shlex.join(table))
    return 0 if args.dry_run else subprocess.call(table)


if __name__ == "__main__":
    sys.exit(main())
