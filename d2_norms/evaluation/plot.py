"""AP against images per GPU, one line per normalizer (FRN Fig. 1 / GN Fig. 1 style), as PNG."""
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence

from .compare import TASK_LABELS, Table


FAILED_LABEL = "run failed (e.g. diverged; AP table)"


@dataclass
class Series:
    label: str
    source: str  # "runs" or a paper table key
    x: List[float]  # images per GPU
    y: List[float]  # mean AP
    yerr: List[float]  # sample std (0 for single runs / paper numbers)
    n: List[int]
    failed_x: List[float] = field(default_factory=list)  # cells whose only runs failed (diverged)


@dataclass
class Panel:
    title: str
    task: str
    metric: str
    series: List[Series] = field(default_factory=list)


@dataclass
class PlotData:
    """What was drawn (for scripts and tests) and the matplotlib figure."""

    path: Optional[str]
    panels: List[Panel]
    figure: Any = None

    def to_dict(self) -> Dict[str, Any]:
        return {"path": self.path, "panels": [
            {"title": p.title, "task": p.task, "metric": p.metric,
             "series": [s.__dict__ for s in p.series]} for p in self.panels]}


def collect_series(table: Table, task: str, metric: str) -> List[Series]:
    """One series per row: the finished (or published) cells with a numeric images-per-GPU, and
    the images-per-GPU whose runs all failed (a diverged cell is a result, drawn as such)."""
    out = []
    for row in table.rows:
        xs, ys, errs, ns, failed = [], [], [], [], []
        for ipg in sorted((g for g in table.images_per_gpu if isinstance(g, (int, float))),
                          reverse=True):
            cell = row.cells.get((task, metric, ipg))
            if cell is None:
                continue
            if cell.mean is None:
                if "failed" in cell.pending:
                    failed.append(float(ipg))
                continue
            xs.append(float(ipg))
            ys.append(cell.mean)
            errs.append(cell.std or 0.0)
            ns.append(cell.n)
        if xs or failed:
            out.append(Series(row.label, row.source, xs, ys, errs, ns, failed))
    return out


def plot_ap_vs_images_per_gpu(tables: Sequence[Table], out_path: Optional[str], *,
                              task: str = "bbox", metric: str = "AP",
                              dpi: int = 120) -> PlotData:
    """Draw one panel per table (dataset x detector) that has ``task`` results and save a PNG.

    x: images per GPU on a log2 axis, largest on the left as in the papers' figures; y: the
    metric; runs as solid lines (error bars = sample std when a cell has several runs), paper
    rows dashed; a cell whose runs failed (e.g. diverged) as an x on the panel's floor in its
    row's colour. Returns the plotted data and the figure (closed after saving when out_path).
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FixedLocator, NullLocator

    panels = []
    for table in tables:
        if task not in table.tasks:
            continue
        series = collect_series(table, task, metric)
        if series:
            panels.append(Panel(f"{table.detector} — {table.dataset}", task, metric, series))
    if not panels:
        have = sorted({t for table in tables for t in table.tasks})
        raise ValueError(
            f"nothing to plot: no finished run has {task} {metric} (tables have tasks {have}); "
            "check the run directories with tools/ap_table.py")

    fig, axes = plt.subplots(1, len(panels), figsize=(6.0 * len(panels), 4.5), squeeze=False)
    for ax, panel in zip(axes[0], panels):
        xs_all = sorted({x for s in panel.series for x in s.x + s.failed_x})
        failed_marks = []
        for s in panel.series:
            paper = s.source != "runs"
            bars = ax.errorbar(s.x, s.y, yerr=s.yerr if any(s.yerr) else None, label=s.label,
                               linestyle="--" if paper else "-", marker="s" if paper else "o",
                               markerfacecolor="none" if paper else None, capsize=3,
                               linewidth=1.5)
            if s.failed_x:
                failed_marks.append((s.failed_x, bars.lines[0].get_color()))
        if failed_marks:
            # Drawn after the lines so that the floor is known; off the data, never a fake 0 AP.
            floor = min(ax.get_ylim()[0], 0.0)
            ax.set_ylim(bottom=floor)
            for xs, color in failed_marks:
                ax.plot(xs, [floor] * len(xs), linestyle="none", marker="x", markersize=9,
                        markeredgewidth=2, color=color, clip_on=False)
            ax.plot([], [], linestyle="none", marker="x", markeredgewidth=2, color="black",
                    label=FAILED_LABEL)
        ax.set_xscale("log", base=2)
        ax.xaxis.set_major_locator(FixedLocator(xs_all))
        ax.xaxis.set_minor_locator(NullLocator())
        ax.set_xticklabels([f"{x:g}" for x in xs_all])
        if len(xs_all) > 1:
            ax.set_xlim(max(xs_all) * 1.25, min(xs_all) / 1.25)  # large batches on the left
        else:
            ax.set_xlim(xs_all[0] * 2, xs_all[0] / 2)
        ax.set_xlabel("images per GPU")
        ax.set_ylabel(f"{TASK_LABELS[panel.task]} {panel.metric} (COCO metric)")
        ax.set_title(panel.title, fontsize=10)
        ax.grid(True, alpha=0.3)
        handles, labels = ax.get_legend_handles_labels()  # matplotlib lists plain lines first
        order = sorted(range(len(labels)), key=lambda i: labels[i] == FAILED_LABEL)
        ax.legend([handles[i] for i in order], [labels[i] for i in order], fontsize=8, loc="best")
    fig.tight_layout()
    if out_path:
        import os

        os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
        fig.savefig(out_path, dpi=dpi)
        plt.close(fig)
    return PlotData(out_path, panels, fig)
