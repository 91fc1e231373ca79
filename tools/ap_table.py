#!/usr/bin/env python
"""Compare runs: AP tables across normalizers and images per GPU, in the papers' layout.

    python tools/ap_table.py output/frn_ipg* output/gn_ipg*        # Markdown to stdout
    python tools/ap_table.py 'output/*' --paper                      # + FRN Table 6 / GN Table 7
    python tools/ap_table.py output/ --csv > ap.csv                  # one line per cell
    python tools/ap_table.py output/ --json -o ap.json --plot ap.png

RUN_DIR is a training/evaluation OUTPUT_DIR (config.yaml, results.json, run_status.json) or a
folder of them; quote globs to let this script expand them (`**` allowed). Rows: normalizers;
columns: AP / AP50 / AP75 under each images-per-GPU (Mask R-CNN: box and mask). Runs still
training or failed are shown as such; several runs of one cell as mean ± std (n), or an error with
--duplicates error. Runs of one cell at different learning rates per image are a sweep (FRN
Table 6's base lr 0.01 / 0.05 / 0.1): the cell shows the best lr's runs, marked "best of N lr",
with every lr's AP in a note. Exit status: 0, or 1 when a run directory could not be read (reasons on stderr;
the table of the others is still printed), 2 on usage errors and duplicate errors.
"""
import argparse
import json
import sys

import d2_norms  # noqa: F401
from d2_norms.evaluation.compare import (
    DuplicateRunsError,
    build_tables,
    collect_runs,
    format_csv,
    format_markdown,
    parse_columns,
    tables_to_json,
)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], epilog=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="*", metavar="RUN_DIR", help="run directories or globs")
    fmt = p.add_mutually_exclusive_group()
    fmt.add_argument("--csv", action="store_true",
                     help="CSV (one line per cell) instead of Markdown")
    fmt.add_argument("--json", action="store_true", help="JSON (tables, runs, problems)")
    p.add_argument("-o", "--output", help="write the table here instead of stdout")
    p.add_argument("--paper", action="store_true",
                   help="add the published rows (FRN Table 6, GN Table 7), labelled as paper")
    p.add_argument("--dataset", help="only this evaluation dataset (default: all, one table each)")
    p.add_argument("--duplicates", choices=("mean", "error"), default="mean",
                   help="several finished runs in one cell: mean ± std (default) or fail")
    p.add_argument("--digits", type=int, default=1, help="decimals in Markdown (default 1)")
    p.add_argument("--columns", nargs="+", metavar="TASK:METRIC",
                   help="Markdown columns to show, in this order, under each images per GPU "
                   "(default: box and mask AP, AP50, AP75), e.g. --columns box:AP box:AP50 "
                   "box:AP75 mask:AP")
    p.add_argument("--plot", metavar="PNG", help="also plot AP vs images per GPU to this PNG")
    p.add_argument("--task", choices=("bbox", "segm"), default="bbox", help="task for --plot")
    p.add_argument("--metric", choices=("AP", "AP50", "AP75"), default="AP",
                   help="metric for --plot")
    args = p.parse_args(argv)
    if not args.runs and not args.paper:
        p.error("give at least one RUN_DIR (or --paper for the published rows alone)")
    if args.columns is not None:
        if args.csv or args.json:
            p.error("--columns selects Markdown columns; --csv and --json hold every cell")
        try:
            args.columns = parse_columns(args.columns)
        except ValueError as e:
            p.error(str(e))
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    records, problems = collect_runs(args.runs)
    for problem in problems:
        print(f"ap_table: cannot read {problem}", file=sys.stderr)
    for record in records:
        for warning in record.warnings:
            print(f"ap_table: warning: {warning}", file=sys.stderr)
    try:
        tables = build_tables(records, dataset=args.dataset, include_paper=args.paper,
                              duplicates=args.duplicates)
    except DuplicateRunsError as e:
        print(f"ap_table: {e}", file=sys.stderr)
        return 2
    if args.dataset and not any(t.dataset == args.dataset for t in tables):
        known = sorted({d for r in records for d in r.datasets})
        print(f"ap_table: no run was evaluated on {args.dataset!r}; datasets found: {known}",
              file=sys.stderr)
    if args.json:
        text = json.dumps(tables_to_json(tables, records, problems), indent=2) + "\n"
    elif args.csv:
        text = format_csv(tables)
    else:
        text = format_markdown(tables, digits=args.digits, columns=args.columns)
    if args.output:
        with open(args.output, "w") as f:
            f.write(text)
    else:
        sys.stdout.write(text)
    if args.plot:
        from d2_norms.evaluation.plot import plot_ap_vs_images_per_gpu

        try:
            plot_ap_vs_images_per_gpu(tables, args.plot, task=args.task, metric=args.metric)
        except ValueError as e:
            print(f"ap_table: --plot: {e}", file=sys.stderr)
            return 1
        print(f"ap_table: wrote {args.plot}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
