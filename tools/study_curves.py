#!/usr/bin/env python
"""Validation curves and the FRN-Table-6-layout table of the batch study (docs/study_batch.md).

    python tools/study_curves.py output/batch-study/* -o docs/study_batch.png \
        --table output/batch-study/batch_table.md --csv output/batch-study/batch_table.csv

RUN_DIR: training run directories (config.yaml, metrics.json, results.json, run_status.json).
A run's normalizer is its MODEL.RESNETS.NORM; ``BN_IMG<k>`` runs form the BN row with one column
per k (images per BN statistics group), every other normalizer a control row (no batch
statistics). Several seeds of one normalizer: mean ± sample std (n). The plot: box AP on the
validation set against the training iteration (each TEST.EVAL_PERIOD evaluation, from
metrics.json; the final one from results.json), one line per normalizer, the mean over seeds
with the seeds' range shaded. The table file also gets the effect sizes (BN's drop from the
largest group and its ratio to each control, beside FRN Table 6) and a plateau check (the last
evaluations' mean AP). Exit 1 when a run directory cannot be read.
"""
import argparse
import json
import math
import os
import re
import sys
from typing import Dict, List, Optional, Tuple

GROUP = re.compile(r"^BN_IMG([1-9]\d*)$")
METRICS = ("AP", "AP50", "AP75")


def read_run(run_dir: str) -> Dict:
    """norm, seed, state, error, final box metrics and the AP curve {iteration: AP}."""
    import yaml

    with open(os.path.join(run_dir, "config.yaml")) as f:
        cfg = yaml.safe_load(f)
    status = {}
    path = os.path.join(run_dir, "run_status.json")
    if os.path.exists(path):
        with open(path) as f:
            status = json.load(f)
    curve: Dict[int, float] = {}
    max_iter = (cfg.get("SOLVER") or {}).get("MAX_ITER")
    path = os.path.join(run_dir, "metrics.json")
    if os.path.exists(path):
        with open(path) as f:
            for line in f:  # one JSON object a line; a resumed run appends (the last one wins)
                line = line.strip()
                if not line:
                    continue
                try:
                    entry = json.loads(line)
                except ValueError:
                    continue  # a line cut by a kill
                if "bbox/AP" in entry and "iteration" in entry:
                    # a periodic evaluation is logged at the index of the iteration it follows,
                    # the one after training at MAX_ITER; NaN (no detection at all) is skipped
                    it = int(entry["iteration"])
                    ap = float(entry["bbox/AP"])
                    if math.isfinite(ap):
                        curve[it if max_iter and it >= max_iter else it + 1] = ap
    final: Dict[str, float] = {}
    path = os.path.join(run_dir, "results.json")
    if os.path.exists(path):
        with open(path) as f:
            results = json.load(f)
        for evaluation in results.get("evaluations", {}).values():
            box = evaluation.get("metrics", {}).get("bbox", {})
            final = {m: box[m] for m in METRICS if box.get(m) is not None}
            if evaluation.get("iteration") is not None and "AP" in final:
                curve[int(evaluation["iteration"])] = final["AP"]
            break
    norm = cfg["MODEL"]["RESNETS"]["NORM"]
    return {"dir": run_dir, "norm": norm, "seed": cfg.get("SEED"),
            "state": status.get("state", "new"), "error": status.get("error", ""),
            "final": final if status.get("state") == "finished" else {},
            "curve": dict(sorted(curve.items()))}


def row_column(norm: str) -> Tuple[str, Optional[int]]:
    m = GROUP.match(norm)
    return ("BN", int(m.group(1))) if m else (norm, None)


def _summary(values: List[float]) -> Tuple[Optional[float], Optional[float]]:
    if not values:
        return None, None
    mean = sum(values) / len(values)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) \
        if len(values) > 1 else None
    return mean, std


def cell_text(runs: List[Dict], metric: str) -> str:
    if not runs:
        return ""
    values = [r["final"][metric] for r in runs if metric in r["final"]]
    bad = [r["state"] for r in runs if r["state"] != "finished"]
    if not values:
        return "failed" if any(s == "failed" for s in bad) else (bad[0] if bad else "")
    mean, std = _summary(values)
    text = f"{mean:.1f}" + (f" ± {std:.1f} ({len(values)})" if std is not None else "")
    if bad:
        text += f" [{len(bad)} {'/'.join(sorted(set(bad)))}]"
    return text


def build(runs: List[Dict]):
    rows: Dict[str, Dict[Optional[int], List[Dict]]] = {}
    for r in runs:
        row, col = row_column(r["norm"])
        rows.setdefault(row, {}).setdefault(col, []).append(r)
    groups = sorted({c for cols in rows.values() for c in cols if c is not None}, reverse=True)
    order = sorted(rows, key=lambda n: (n != "BN", n))
    return rows, groups, order


def markdown(runs: List[Dict]) -> str:
    rows, groups, order = build(runs)
    has_controls = any(None in rows[n] for n in order)
    header = ["normalizer"]
    for m in METRICS:
        header += [f"{m}@{k}" for k in groups] + ([f"{m} (no batch stats)"] if has_controls else [])
    lines = [
        "box AP on the validation set (COCO evaluation, 0-100) at the end of training; `@k` = "
        "BN statistics over groups of k images of the batch of 8 (BN_IMG<k>; @8 is plain BN); "
        "controls have no batch statistics; mean ± sample std (n seeds).", "",
        "| " + " | ".join(header) + " |", "|---" + "|---:" * (len(header) - 1) + "|"]
    for name in order:
        cells = []
        for m in METRICS:
            cells += [cell_text(rows[name].get(k, []), m) for k in groups]
            if has_controls:
                cells.append(cell_text(rows[name].get(None, []), m))
        lines.append("| " + " | ".join([name] + cells) + " |")
    notes = [f"- {os.path.basename(r['dir'])}: {r['state']}: {r['error'][:200]}"
             for r in runs if r["state"] not in ("finished",)]
    return "\n".join(lines + ([""] + notes if notes else [])) + "\n"


# FRN paper, Table 6: RetinaNet R50-FPN trained from scratch on COCO, 8 GPUs, box AP at 8 / 4 / 2
# images per GPU (there the total batch and the schedule change with it; here they do not).
FRN_TABLE6_AP = {"BN": {8: 38.7, 4: 37.9, 2: 30.2}, "GN": {8: 39.3, 4: 39.0, 2: 38.7},
                 "FRN": {8: 39.6, 4: 39.5, 2: 39.1}}
# the study's control that stands for the paper's row of that name
PAPER_ROW = {"GN": "GN", "FRN_LEPS": "FRN", "FRN": "FRN"}
MIN_CONTROL_AP = 1.0


def _final_aps(runs: List[Dict]) -> List[float]:
    return [r["final"]["AP"] for r in runs if "AP" in r["final"]]


def _difference(a: List[float], b: List[float]) -> str:
    """mean(a) - mean(b) ± its standard error over seeds (when both have 2+ seeds)."""
    (ma, sa), (mb, sb) = _summary(a), _summary(b)
    text = f"{ma - mb:+.1f}"
    if sa is not None and sb is not None:
        text += f" ± {math.sqrt(sa ** 2 / len(a) + sb ** 2 / len(b)):.1f}"
    return text


def effect_sizes(runs: List[Dict]) -> str:
    """BN's loss as its statistics shrink, measured beside FRN Table 6: the drop from the
    largest group (AP points) and the ratio to each control that has a paper row."""
    rows, groups, _ = build(runs)
    bn = {k: _final_aps(rows.get("BN", {}).get(k, [])) for k in groups}
    if not groups or not bn[groups[0]]:
        return ""
    top = groups[0]
    head = "| | " + " | ".join(f"{k} img" for k in groups) + " |"
    lines = ["Effect sizes: BN with statistics over k images against BN over "
             f"{top} and against the controls (box AP; measured ± standard error over seeds), "
             "beside FRN Table 6 (RetinaNet R50-FPN from scratch on COCO, k images per GPU; "
             "there the total batch also shrinks with k).", "", head,
             "|---" + "|---:" * len(groups) + "|"]

    lines.append("| BN@k − BN@%d, measured | " % top + " | ".join(
        "ref." if k == top else _difference(bn[k], bn[top]) if bn[k] else "" for k in groups)
        + " |")
    ref = FRN_TABLE6_AP["BN"]
    lines.append("| BN@k − BN@8, FRN Table 6 | " + " | ".join(
        f"{ref[k] - ref[8]:.1f}" if k in ref else "—" for k in groups) + " |")
    untrained = []
    for control in sorted(c for c in rows if c != "BN" and None in rows[c]):
        aps = _final_aps(rows[control][None])
        if not aps:
            continue
        mean = sum(aps) / len(aps)
        if mean < MIN_CONTROL_AP:  # a ratio to a control that detects nothing says nothing
            untrained.append(f"{control} ({mean:.1f})")
            continue
        lines.append(f"| BN@k / {control}, measured | " + " | ".join(
            f"{sum(bn[k]) / len(bn[k]) / mean:.2f}" if bn[k] else ""
            for k in groups) + " |")
        if control in PAPER_ROW:
            row = FRN_TABLE6_AP[PAPER_ROW[control]]
            lines.append(f"| BN@k / {PAPER_ROW[control]}@k, FRN Table 6 | " + " | ".join(
                f"{ref[k] / row[k]:.2f}" if k in ref else "—" for k in groups) + " |")
    if untrained:
        lines += ["", f"No ratio to {', '.join(untrained)}: mean box AP below "
                      f"{MIN_CONTROL_AP:.0f}."]
    return "\n".join(lines) + "\n"


def plateau(runs: List[Dict], last: int = 3) -> str:
    """Mean box AP over seeds at each normalizer's last ``last`` evaluations, and the change
    over the final interval: whether training had flattened."""
    data = curves(runs)
    if not data:
        return ""
    its = sorted({i for c in data.values() for i in c})[-last:]
    lines = ["Plateau check: mean box AP over seeds at the last evaluations (iteration), and "
             "the change over the last interval.", "",
             "| normalizer | " + " | ".join(f"it {i}" for i in its) + " | last change |",
             "|---" + "|---:" * (len(its) + 1) + "|"]
    order = sorted(data, key=lambda n: (row_column(n)[0] != "BN", -(row_column(n)[1] or 0), n))
    for norm in order:
        means = [sum(data[norm][i]) / len(data[norm][i]) if i in data[norm] else None
                 for i in its]
        change = f"{means[-1] - means[-2]:+.1f}" if None not in means[-2:] else ""
        lines.append(f"| {norm} | " + " | ".join(
            "" if m is None else f"{m:.1f}" for m in means) + f" | {change} |")
    return "\n".join(lines) + "\n"


def report(runs: List[Dict]) -> str:
    """The final-AP table, the effect sizes beside the paper's and the plateau check."""
    parts = [markdown(runs), effect_sizes(runs), plateau(runs)]
    return "\n".join(p for p in parts if p)


def csv_text(runs: List[Dict]) -> str:
    out = ["run,normalizer,row,images_per_bn_group,seed,state," + ",".join(METRICS)]
    for r in runs:
        row, col = row_column(r["norm"])
        out.append(",".join([os.path.basename(r["dir"]), r["norm"], row,
                             "" if col is None else str(col), str(r["seed"]), r["state"]]
                            + [f"{r['final'][m]:.4f}" if m in r["final"] else ""
                               for m in METRICS]))
    return "\n".join(out) + "\n"


def curves(runs: List[Dict]) -> Dict[str, Dict[int, List[float]]]:
    """normalizer -> iteration -> AP of each seed evaluated there."""
    out: Dict[str, Dict[int, List[float]]] = {}
    for r in runs:
        for it, ap in r["curve"].items():
            out.setdefault(r["norm"], {}).setdefault(it, []).append(ap)
    return out


def plot(runs: List[Dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = curves(runs)
    if not data:
        raise ValueError("no evaluation in any run: nothing to plot")
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    order = sorted(data, key=lambda n: (not GROUP.match(n), -int(GROUP.match(n).group(1))
                                        if GROUP.match(n) else 0, n))
    for norm in order:
        its = sorted(data[norm])
        mean = [sum(data[norm][i]) / len(data[norm][i]) for i in its]
        style = "-" if GROUP.match(norm) else "--"
        line, = ax.plot(its, mean, style, marker="o", ms=3,
                        label=f"{norm} ({max(len(data[norm][i]) for i in its)} seeds)")
        ax.fill_between(its, [min(data[norm][i]) for i in its], [max(data[norm][i]) for i in its],
                        color=line.get_color(), alpha=0.15)
    ax.set_xlabel("iteration (8 images each)")
    ax.set_ylabel("box AP (validation)")
    ax.set_title("RetinaNet R18-FPN, batch 8: BN over k images (BN_IMG<k>) vs controls")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left")  # curves rise to the right
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], epilog=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", metavar="RUN_DIR")
    p.add_argument("-o", "--output", metavar="PNG", help="the AP-vs-iteration plot")
    p.add_argument("--table", metavar="MD", help="write the Markdown table here (else stdout)")
    p.add_argument("--csv", metavar="CSV", help="one line per run")
    p.add_argument("--print-curves", action="store_true", help="print the curves as JSON")
    args = p.parse_args(argv)
    runs, problems = [], []
    for d in args.runs:
        try:
            runs.append(read_run(d))
        except (OSError, ValueError, KeyError, TypeError) as e:
            problems.append(f"{d}: {e}")
    for problem in problems:
        print(f"study_curves: cannot read {problem}", file=sys.stderr)
    text = report(runs)
    if args.table:
        with open(args.table, "w") as f:
            f.write(text)
    else:
        sys.stdout.write(text)
    if args.csv:
        with open(args.csv, "w") as f:
            f.write(csv_text(runs))
    if args.print_curves:
        print(json.dumps(curves(runs), indent=1, sort_keys=True))
    if args.output:
        try:
            plot(runs, args.output)
        except ValueError as e:
            print(f"study_curves: {e}", file=sys.stderr)
            return 1
        print(f"study_curves: wrote {args.output}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
