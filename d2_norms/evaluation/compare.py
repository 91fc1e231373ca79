"""Compare runs: read run directories, group them detector x normalizer x images per GPU, and lay
the AP numbers out as the papers do (FRN Table 6: rows = normalizers, AP / AP50 / AP75 under each
images-per-GPU; GN Table 7: box and mask AP for Mask R-CNN).

Nothing is dropped silently: runs still training or failed appear as such in their cells, several
finished runs of one cell are shown as mean ± sample standard deviation with their count (or,
with ``duplicates="error"``, raise :class:`DuplicateRunsError`), and run directories that cannot be
read are reported as problems with the reason.

Learning-rate sweeps: finished runs of one cell trained at different learning rates per image
(``base_lr / ims_per_batch``, unchanged by detectron2's auto-scaling) are the points of a sweep,
as the FRN paper's base lr in {0.01, 0.05, 0.1} (sec. 4.3: "we report the best"). The cell shows
the lr whose runs have the highest mean AP of the table's first task, marked "best of N lr", and
a note lists every lr with its AP. Runs at one lr still average as above.
"""
import csv
import glob
import io
import math
import os
from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

from .paper_results import PAPER_TABLES, PaperTable
from .run_files import (
    CONFIG_FILE,
    METRICS_FILE,
    RE_EVAL_HINT,
    RESULTS_FILE,
    RUN_STATUS_FILE,
    RunFileError,
    describe_run,
    last_logged_iteration,
    load_config_yaml,
    load_results,
    load_run_status,
)

TABLE_METRICS = ("AP", "AP50", "AP75")
TASK_LABELS = {"bbox": "box", "segm": "mask"}
# Row order of the papers' tables (BN first, the proposed normalizer last); others alphabetical.
NORM_ORDER = ("BN*", "FrozenBN", "BN", "SyncBN", "naiveSyncBN", "none", "GN", "GNWS", "GN+WS",
              "FRN", "NF")
PENDING_STATES = ("running", "failed", "no results")


class DuplicateRunsError(ValueError):
    """Several finished runs fall into one table cell and duplicates="error" was asked for."""


# ----------------------------------------------------------------------------- runs


@dataclass
class RunRecord:
    """What ap_table knows about one run directory."""

    path: str
    status: str  # "finished", "running", "failed" or "no results"
    run: Dict[str, Any]  # describe_run(...)
    evaluations: Dict[str, Dict[str, Any]] = field(default_factory=dict)
    status_info: Dict[str, Any] = field(default_factory=dict)
    last_iteration: Optional[int] = None  # from metrics.json
    warnings: List[str] = field(default_factory=list)

    @property
    def datasets(self) -> List[str]:
        if self.status == "finished":
            return list(self.evaluations)
        return list(self.run.get("test_datasets") or []) or ["?"]

    def progress(self) -> str:
        """e.g. "running, iteration 120 of 400", "failed at iteration 7: RuntimeError: ..."."""
        it = self.status_info.get("iteration", self.last_iteration)
        if self.last_iteration is not None and (it is None or self.last_iteration > it):
            it = self.last_iteration
        total = self.status_info.get("max_iter", self.run.get("max_iter"))
        where = f"iteration {it}" + (f" of {total}" if total else "") if it is not None else ""
        if self.status == "failed":
            error = self.status_info.get("error", "")
            return "failed" + (f" at {where}" if where else "") + (f": {error}" if error else "")
        if self.status == "running":
            return "running" + (f", {where}" if where else "") + (
                f" (status updated {self.status_info['updated_at']})"
                if self.status_info.get("updated_at") else "")
        return self.status


def _is_run_dir(path: str) -> bool:
    return any(os.path.exists(os.path.join(path, f))
               for f in (CONFIG_FILE, RESULTS_FILE, RUN_STATUS_FILE))


def load_run(run_dir: str) -> RunRecord:
    """Read one run directory (results.json, run_status.json, config.yaml, metrics.json).

    Raises :class:`RunFileError` when a present file is malformed, or when the directory has
    neither results.json nor config.yaml.
    """
    results_path = os.path.join(run_dir, RESULTS_FILE)
    status_path = os.path.join(run_dir, RUN_STATUS_FILE)
    status_info = load_run_status(status_path) if os.path.exists(status_path) else {}
    results = load_results(results_path) if os.path.exists(results_path) else None
    if results is not None:
        run = dict(results["run"])
    else:
        cfg = load_config_yaml(os.path.join(run_dir, CONFIG_FILE))
        run = describe_run(cfg, world_size=status_info.get("world_size"))
    record = RunRecord(path=run_dir, status="no results", run=run, status_info=status_info,
                       last_iteration=last_logged_iteration(os.path.join(run_dir, METRICS_FILE)))
    state = status_info.get("state")
    if results is not None:
        record.evaluations = dict(results["evaluations"])
    if state in ("running", "failed"):
        record.status = state
    elif results is not None:
        record.status = "finished"
    elif state == "finished":
        record.warnings.append(
            f"{run_dir}: run_status.json says finished but there is no results.json "
            f"(evaluation did not run or failed); {RE_EVAL_HINT}")
    else:
        record.warnings.append(
            f"{run_dir}: no results.json and no run_status.json (training did not start through "
            "d2_norms' train_net, or stopped before evaluating)")
    if run.get("images_per_gpu") is None:
        record.warnings.append(
            f"{run_dir}: images per GPU unknown ({run.get('images_per_gpu_source')})")
    return record


def _expand(pattern: str) -> List[str]:
    if glob.has_magic(pattern):
        return sorted(glob.glob(pattern, recursive=True))
    return [pattern] if os.path.exists(pattern) else []


def collect_runs(patterns: Iterable[str]) -> Tuple[List[RunRecord], List[str]]:
    """Load every run directory named by ``patterns`` (paths or globs).

    A directory that is not itself a run but holds runs (e.g. an ``output/`` folder) stands for
    its run subdirectories. Returns (records, problems); each problem is one readable sentence
    naming the path and what is wrong.
    """
    records: List[RunRecord] = []
    problems: List[str] = []
    seen = set()
    for pattern in patterns:
        paths = _expand(pattern)
        if not paths:
            problems.append(f"{pattern}: no such run directory")
            continue
        for path in paths:
            if not os.path.isdir(path):
                if glob.has_magic(pattern):
                    continue  # a glob also matching files (e.g. runs/*) is fine
                problems.append(f"{path}: not a directory (pass run directories, i.e. OUTPUT_DIRs)")
                continue
            if _is_run_dir(path):
                run_dirs = [path]
            else:
                run_dirs = sorted(os.path.join(path, d) for d in os.listdir(path)
                                  if os.path.isdir(os.path.join(path, d))
                                  and _is_run_dir(os.path.join(path, d)))
                if not run_dirs:
                    problems.append(
                        f"{path}: not a run directory (no {CONFIG_FILE}, {RESULTS_FILE} or "
                        f"{RUN_STATUS_FILE}) and holds none")
                    continue
            for run_dir in run_dirs:
                key = os.path.realpath(run_dir)
                if key in seen:
                    continue
                seen.add(key)
                try:
                    record = load_run(run_dir)
                except RunFileError as e:
                    problems.append(str(e))
                    continue
                records.append(record)
    return records, problems


# ----------------------------------------------------------------------------- tables


@dataclass
class Cell:
    """One table cell: values of the finished runs (or the paper) and the runs not finished."""

    values: List[Optional[float]] = field(default_factory=list)
    runs: List[str] = field(default_factory=list)
    pending: Dict[str, List[str]] = field(default_factory=dict)  # state -> run dirs
    paper: Optional[str] = None  # paper table key for published numbers
    lrs: List[Optional[float]] = field(default_factory=list)  # lr per image of each value
    sweep: Dict[str, Optional[float]] = field(default_factory=dict)  # lr label -> mean AP

    @property
    def finite(self) -> List[float]:
        return [v for v in self.values if v is not None and math.isfinite(v)]

    @property
    def n(self) -> int:
        return len(self.values)

    @property
    def mean(self) -> Optional[float]:
        f = self.finite
        return sum(f) / len(f) if f else None

    @property
    def std(self) -> Optional[float]:
        """Sample standard deviation (n - 1) over the finished runs; None below two values."""
        f = self.finite
        if len(f) < 2:
            return None
        m = sum(f) / len(f)
        return math.sqrt(sum((v - m) ** 2 for v in f) / (len(f) - 1))

    @property
    def status(self) -> str:
        if self.paper:
            return "paper"
        if self.values:
            return "finished, best of lr sweep" if self.sweep else "finished"
        if self.pending:
            return "+".join(s for s in PENDING_STATES if s in self.pending)
        return "empty"

    def text(self, digits: int = 1) -> str:
        pending = [(s, len(self.pending[s])) for s in PENDING_STATES if s in self.pending]
        if self.values:
            mean = self.mean
            if mean is None:
                out = "n/a"  # COCO could not compute it (no detections / no objects of that size)
            elif self.n == 1:
                out = f"{mean:.{digits}f}"
            else:
                std = self.std
                out = f"{mean:.{digits}f} ± {std:.{digits}f} (n={self.n})" if std is not None \
                    else f"{mean:.{digits}f} (n={self.n})"
            if self.sweep:
                out += f" (best of {len(self.sweep)} lr)"
            if pending:
                out += " (" + ", ".join(f"+{k} {s}" for s, k in pending) + ")"
            return out
        if pending:
            return ", ".join(s if k == 1 else f"{s} ×{k}" for s, k in pending)
        return "–"


@dataclass
class Row:
    label: str
    normalizer: str
    source: str  # "runs" or a paper table key
    cells: Dict[Tuple[str, str, Any], Cell] = field(default_factory=dict)
    detail: str = ""  # label naming every part's normalizer, used when rows would collide

    def cell(self, task: str, metric: str, ipg) -> Cell:
        return self.cells.setdefault((task, metric, ipg), Cell())


@dataclass
class Table:
    dataset: str
    detector: str  # e.g. "RetinaNet R50-FPN"
    arch: str  # "RetinaNet", "Mask R-CNN", ...
    tasks: Tuple[str, ...]
    images_per_gpu: List[Any]
    rows: List[Row]
    notes: List[str] = field(default_factory=list)
    metrics: Tuple[str, ...] = TABLE_METRICS

    def columns(self, selected: Optional[Sequence[Tuple[str, str]]] = None
                ) -> List[Tuple[str, str, Any]]:
        """(task, metric, images per GPU) in the papers' order: metric blocks, ipg inside;
        ``selected`` (task, metric) pairs keep those blocks, in that order, where the table has
        the task."""
        pairs = [(t, m) for t in self.tasks for m in self.metrics]
        if selected is not None:
            pairs = [(t, m) for t, m in selected if t in self.tasks]
        return [(t, m, g) for t, m in pairs for g in self.images_per_gpu]

    def column_label(self, task: str, metric: str, ipg) -> str:
        prefix = f"{TASK_LABELS[task]} " if len(self.tasks) > 1 else ""
        return f"{prefix}{metric}@{ipg}"


def _lr_per_image(run: Dict[str, Any]) -> Optional[float]:
    lr, batch = run.get("base_lr"), run.get("ims_per_batch")
    if not isinstance(lr, (int, float)) or not isinstance(batch, (int, float)) or batch <= 0:
        return None
    return float(f"{lr / batch:.6g}")  # equal for runs of one recipe on any GPU count


def _lr_label(lr_per_image: Optional[float], table: Table) -> str:
    if lr_per_image is None:
        return "lr ?"
    if table.arch == "RetinaNet":  # the FRN paper quotes base lr at its reference batch 64
        return f"base lr {lr_per_image * 64:.4g}"
    return f"lr/image {lr_per_image:.4g}"


def _keep_best_of_lr_sweep(table: Table, row: Row, ipg) -> None:
    """Several lrs in one cell: keep the runs of the lr with the best mean AP (first task)."""
    primary = row.cells.get((table.tasks[0], "AP", ipg))
    if primary is None or len(set(primary.lrs)) < 2:
        return
    means: Dict[Optional[float], Optional[float]] = {}
    for lr in dict.fromkeys(primary.lrs):
        vals = [v for v, x in zip(primary.values, primary.lrs)
                if x == lr and v is not None and math.isfinite(v)]
        means[lr] = sum(vals) / len(vals) if vals else None
    ranked = [lr for lr in means if means[lr] is not None]
    if not ranked:
        return
    best = max(ranked, key=lambda lr: means[lr])
    sweep = {_lr_label(lr, table): means[lr]
             for lr in sorted(means, key=lambda x: (x is None, x or 0.0))}
    for key, cell in row.cells.items():
        if key[2] != ipg or len(cell.lrs) != len(cell.values):
            continue
        keep = [i for i, x in enumerate(cell.lrs) if x == best]
        cell.values = [cell.values[i] for i in keep]
        cell.runs = [cell.runs[i] for i in keep]
        cell.lrs = [cell.lrs[i] for i in keep]
        cell.sweep = dict(sweep)
    listed = ", ".join(f"{k}: " + ("n/a" if v is None else f"{v:.1f}") for k, v in sweep.items())
    table.notes.append(f"{row.label} @{ipg}: best of lr sweep = {_lr_label(best, table)} "
                       f"({TASK_LABELS[table.tasks[0]]} AP {listed})")


def _norm_sort_key(label: str):
    base = label.split(" (")[0]
    return (NORM_ORDER.index(base) if base in NORM_ORDER else len(NORM_ORDER), label)


def _ipg_sort_key(ipg):
    return (-float(ipg)) if isinstance(ipg, (int, float)) else float("inf")


def build_tables(records: Sequence[RunRecord], *, dataset: Optional[str] = None,
                 include_paper: bool = False, duplicates: str = "mean") -> List[Table]:
    """Group runs into tables (one per dataset x detector) of normalizer rows.

    dataset: keep only this evaluation dataset. include_paper: add FRN Table 6 / GN Table 7 rows
    to the tables of the same detector family (or as tables of their own). duplicates: "mean"
    (mean ± std with n) or "error" (raise :class:`DuplicateRunsError`).
    """
    if duplicates not in ("mean", "error"):
        raise ValueError(f"duplicates must be 'mean' or 'error', got {duplicates!r}")
    tables: Dict[Tuple[str, str], Table] = {}
    rows: Dict[Tuple, Row] = {}
    unfinished = []
    for rec in records:
        run = rec.run
        ipg = run.get("images_per_gpu")
        ipg = "?" if ipg is None else ipg
        for ds in rec.datasets:
            if dataset is not None and ds != dataset:
                continue
            tkey = (ds, run["detector_label"])
            table = tables.get(tkey)
            if table is None:
                tasks = ("bbox", "segm") if run.get("detector") == "Mask R-CNN" else ("bbox",)
                table = tables[tkey] = Table(ds, run["detector_label"], run.get("detector", "?"),
                                             tasks, [], [])
            if ipg not in table.images_per_gpu:
                table.images_per_gpu.append(ipg)
            norms = run.get("norms") or {}
            rkey = (ds, run["detector_label"], run["normalizer"], tuple(sorted(norms.items())))
            row = rows.get(rkey)
            if row is None:
                parts = ", ".join(f"{k}: {v}" for k, v in norms.items() if k != "backbone")
                row = rows[rkey] = Row(run["normalizer"], run["normalizer"], "runs",
                                       detail=run["normalizer"] + (f" ({parts})" if parts else ""))
                table.rows.append(row)
            if rec.status == "finished":
                metrics = rec.evaluations[ds]["metrics"]
                if "segm" in metrics and "segm" not in table.tasks:
                    table.tasks = table.tasks + ("segm",)
                for task in table.tasks:
                    for metric in TABLE_METRICS:
                        if task in metrics:
                            cell = row.cell(task, metric, ipg)
                            cell.values.append(metrics[task].get(metric))
                            cell.runs.append(rec.path)
                            cell.lrs.append(_lr_per_image(run))
            else:
                for task in ("bbox", "segm"):
                    for metric in TABLE_METRICS:
                        row.cell(task, metric, ipg).pending.setdefault(rec.status, []).append(
                            rec.path)
                unfinished.append((table, row, ipg, rec))

    for table in tables.values():
        # Runs whose backbone normalizer matches but whose FPN / head normalizers differ get
        # rows of their own, named in full.
        counts: Dict[str, int] = {}
        for row in table.rows:
            counts[row.normalizer] = counts.get(row.normalizer, 0) + 1
        for row in table.rows:
            if counts[row.normalizer] > 1:
                row.label = row.detail
    for table, row, ipg, rec in unfinished:
        table.notes.append(f"{row.label} @{ipg}: {rec.path} {rec.progress()}")
    for table in tables.values():
        for row in table.rows:
            for ipg in table.images_per_gpu:
                _keep_best_of_lr_sweep(table, row, ipg)

    for table in tables.values():
        # Cells created for a task the table does not show (pending runs) are dropped.
        for row in table.rows:
            row.cells = {k: c for k, c in row.cells.items() if k[0] in table.tasks}
        table.rows.sort(key=lambda r: _norm_sort_key(r.label))
        dups = []
        for row in table.rows:
            for ipg in table.images_per_gpu:
                cell = row.cells.get((table.tasks[0], "AP", ipg))
                if cell is not None and cell.n > 1:
                    dups.append(f"{row.label} @{ipg}: {cell.n} finished runs "
                                f"({', '.join(cell.runs)})")
        if dups and duplicates == "error":
            raise DuplicateRunsError(
                f"{table.detector} on {table.dataset}: several runs per cell (expected one):\n  "
                + "\n  ".join(dups) + "\nremove or move the extra runs, or use duplicates='mean'")
        table.notes.extend(f"duplicates, shown as mean ± sample std: {d}" for d in dups)

    out = list(tables.values())
    if include_paper:
        out = _attach_paper_rows(out)
    for table in out:
        table.images_per_gpu.sort(key=_ipg_sort_key)
    out.sort(key=lambda t: (t.dataset, t.detector))
    return out


def _paper_rows(paper: PaperTable, tasks: Sequence[str]) -> List[Row]:
    rows = []
    for prow in paper.rows:
        label = f"{prow.normalizer} [paper: {paper.key}, {prow.backbone}]"
        row = Row(label, prow.normalizer, paper.key)
        for ipg, per_task in prow.values.items():
            for task, metrics in per_task.items():
                if task not in tasks:
                    continue
                for metric, value in metrics.items():
                    row.cells[(task, metric, ipg)] = Cell(values=[value], paper=paper.key)
        rows.append(row)
    return rows


def _paper_note(paper: PaperTable) -> str:
    return f"[paper: {paper.key}] {paper.citation}; {paper.dataset}; {paper.setup}"


def _attach_paper_rows(tables: List[Table]) -> List[Table]:
    for paper in PAPER_TABLES:
        matching = [t for t in tables if t.arch == paper.detector]
        if not matching:
            matching = [Table(paper.dataset, f"{paper.detector} (published)", paper.detector,
                              paper.tasks, [], [])]
            tables = tables + matching
        for table in matching:
            for row in _paper_rows(paper, table.tasks):
                table.rows.append(row)
                for (_, _, ipg) in row.cells:
                    if ipg not in table.images_per_gpu:
                        table.images_per_gpu.append(ipg)
            table.notes.append(_paper_note(paper))
    return tables


# ----------------------------------------------------------------------------- output formats


def parse_columns(specs: Sequence[str]) -> List[Tuple[str, str]]:
    """``["box:AP", "box:AP50", "mask:AP"]`` -> ``[("bbox", "AP"), ("bbox", "AP50"), ("segm",
    "AP")]``; the task may be written box/mask or bbox/segm. ValueError names a bad entry."""
    tasks = {**{t: t for t in TASK_LABELS}, **{label: t for t, label in TASK_LABELS.items()}}
    out = []
    for spec in specs:
        task, _, metric = spec.partition(":")
        if task not in tasks or metric not in TABLE_METRICS:
            raise ValueError(
                f"column {spec!r}: write TASK:METRIC with TASK one of {sorted(tasks)} and METRIC "
                f"one of {list(TABLE_METRICS)}, e.g. box:AP mask:AP")
        out.append((tasks[task], metric))
    return out


def format_markdown(tables: Sequence[Table], digits: int = 1,
                    columns: Optional[Sequence[Tuple[str, str]]] = None) -> str:
    """The tables as Markdown, one section per dataset x detector, with notes under each;
    ``columns`` (from :func:`parse_columns`) keeps those (task, metric) blocks; a table with
    none of them is left out with a line saying so."""
    if not tables:
        return "(no runs to tabulate)\n"
    parts = []
    for table in tables:
        cols = table.columns(columns)
        if not cols:
            parts.append(f"(### {table.detector} — {table.dataset}: none of the selected "
                         f"columns applies; it has {', '.join(table.tasks)})\n")
            continue
        parts.append(f"### {table.detector} — {table.dataset}\n")
        shown = list(dict.fromkeys(t for t, _, _ in cols))
        tasks = " and ".join(f"{TASK_LABELS[t]} AP" for t in shown)
        parts.append(f"{tasks} by the COCO evaluation (0-100); `@N` = N images per GPU; several "
                     "runs in a cell: mean ± sample std (n runs).\n")
        header = ["normalizer"] + [table.column_label(*c) for c in cols]
        parts.append("| " + " | ".join(header) + " |")
        parts.append("|" + "|".join(["---"] + ["---:"] * len(cols)) + "|")
        for row in table.rows:
            cells = [row.cells[c].text(digits) if c in row.cells else "–" for c in cols]
            parts.append("| " + " | ".join([row.label] + cells) + " |")
        if table.notes:
            parts.append("")
            parts.extend(f"- {n}" for n in table.notes)
        parts.append("")
    return "\n".join(parts) + "\n"


CSV_FIELDS = ("dataset", "detector", "row", "normalizer", "source", "images_per_gpu", "task",
              "metric", "mean", "std", "n", "values", "status", "runs")


def _cell_rows(tables: Sequence[Table]):
    for table in tables:
        for row in table.rows:
            for (task, metric, ipg) in table.columns():
                cell = row.cells.get((task, metric, ipg))
                if cell is None:
                    continue
                yield table, row, task, metric, ipg, cell


def format_csv(tables: Sequence[Table]) -> str:
    """One line per (table, row, task, metric, images per GPU) cell; empty cells omitted."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(CSV_FIELDS)
    for table, row, task, metric, ipg, cell in _cell_rows(tables):
        pending = ";".join(p for s in PENDING_STATES for p in cell.pending.get(s, []))
        writer.writerow([
            table.dataset, table.detector, row.label, row.normalizer, row.source, ipg, task,
            metric, "" if cell.mean is None else repr(round(cell.mean, 6)),
            "" if cell.std is None else repr(round(cell.std, 6)), cell.n,
            ";".join("" if v is None else repr(v) for v in cell.values), cell.status,
            ";".join(cell.runs + ([pending] if pending else [])),
        ])
    return buf.getvalue()


def tables_to_json(tables: Sequence[Table], records: Sequence[RunRecord] = (),
                   problems: Sequence[str] = ()) -> Dict[str, Any]:
    """Everything ap_table knows, as a JSON-ready dict (tables, runs, problems)."""
    out_tables = []
    for table in tables:
        out_rows = []
        for row in table.rows:
            cells = []
            for (task, metric, ipg) in table.columns():
                cell = row.cells.get((task, metric, ipg))
                if cell is None:
                    continue
                cells.append({"task": task, "metric": metric, "images_per_gpu": ipg,
                              "mean": cell.mean, "std": cell.std, "n": cell.n,
                              "values": cell.values, "status": cell.status, "runs": cell.runs,
                              "pending": cell.pending, "paper": cell.paper,
                              "lr_sweep": cell.sweep or None})
            out_rows.append({"label": row.label, "normalizer": row.normalizer,
                             "source": row.source, "cells": cells})
        out_tables.append({"dataset": table.dataset, "detector": table.detector,
                           "arch": table.arch, "tasks": list(table.tasks),
                           "metrics": list(table.metrics),
                           "images_per_gpu": list(table.images_per_gpu), "rows": out_rows,
                           "notes": list(table.notes)})
    runs = [{"path": r.path, "status": r.status, "progress": r.progress(), "run": r.run,
             "evaluations": r.evaluations, "warnings": r.warnings} for r in records]
    return {"schema_version": 1, "tables": out_tables, "runs": runs, "problems": list(problems)}
