#!/usr/bin/env python
"""Plot AP against images per GPU, one line per normalizer (as FRN Fig. 1 / GN Fig. 1).

    python tools/plot_ap.py 'output/*' -o ap_vs_batch.png
    python tools/plot_ap.py 'output/*' -o mask_ap.png --task segm --paper

One panel per dataset x detector; several runs at one point: mean with a sample-std error bar;
published rows (--paper) dashed. Runs not finished are not plotted (tools/ap_table.py lists them).
Prints the plotted series as JSON with --print-data. Exit status 1 if a run directory could not be
read (reasons on stderr) or there is nothing to plot.
"""
import argparse
import json
import sys

import d2_norms  # noqa: F401
from d2_norms.evaluation.compare import build_tables, collect_runs
from d2_norms.evaluation.plot import plot_ap_vs_images_per_gpu


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], epilog=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="*", metavar="RUN_DIR", help="run directories or globs")
    p.add_argument("-o", "--output", required=True, metavar="PNG")
    p.add_argument("--task", choices=("bbox", "segm"), default="bbox")
    p.add_argument("--metric", choices=("AP", "AP50", "AP75"), default="AP")
    p.add_argument("--paper", action="store_true", help="add FRN Table 6 / GN Table 7 rows")
    p.add_argument("--dataset", help="only this evaluation dataset")
    p.add_argument("--print-data", action="store_true", help="print the plotted series as JSON")
    args = p.parse_args(argv)
    if not args.runs and not args.paper:
        p.error("give at least one RUN_DIR (or --paper for the published rows alone)")
    records, problems = collect_runs(args.runs)
    for problem in problems:
        print(f"plot_ap: cannot read {problem}", file=sys.stderr)
    tables = build_tables(records, dataset=args.dataset, include_paper=args.paper)
    try:
        data = plot_ap_vs_images_per_gpu(tables, args.output, task=args.task, metric=args.metric)
    except ValueError as e:
        print(f"plot_ap: {e}", file=sys.stderr)
        return 1
    if args.print_data:
        print(json.dumps(data.to_dict(), indent=2))
    print(f"plot_ap: wrote {args.output} ({sum(len(p.series) for p in data.panels)} series in "
          f"{len(data.panels)} panel(s))", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
