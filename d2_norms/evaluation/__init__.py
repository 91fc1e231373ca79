"""Evaluation and comparison: COCO AP with faster-coco-eval / pycocotools, run result files,
AP tables across runs (FRN Table 6 / GN Table 7 layout) and AP-vs-images-per-GPU plots.

Trainer-facing API: :func:`build_evaluator`, :func:`save_results`,
:func:`write_run_status`. Comparison API (used by tools/ap_table.py and tools/plot_ap.py):
:func:`collect_runs`, :func:`build_tables`, :func:`format_markdown`, :func:`format_csv`,
:func:`tables_to_json`, :func:`plot_ap_vs_images_per_gpu`. File schemas: docs/evaluation.md.
"""
from .backends import (
    BACKENDS,
    COCO_METRICS,
    CocoEvalOutput,
    evaluate_coco_results,
    load_coco_gt,
    resolve_backend,
)
from .coco_evaluator import D2NormsCOCOEvaluator, build_evaluator
from .compare import (
    Cell,
    DuplicateRunsError,
    RunRecord,
    Table,
    build_tables,
    collect_runs,
    format_csv,
    format_markdown,
    load_run,
    parse_columns,
    tables_to_json,
)
from .paper_results import PAPER_TABLES
from .plot import plot_ap_vs_images_per_gpu
from .run_files import (
    RunFileError,
    describe_run,
    load_results,
    load_run_status,
    save_results,
    write_run_status,
)

__all__ = [
    "BACKENDS", "COCO_METRICS", "CocoEvalOutput", "evaluate_coco_results", "load_coco_gt",
    "resolve_backend", "D2NormsCOCOEvaluator", "build_evaluator",
    "Cell", "DuplicateRunsError", "RunRecord", "Table", "build_tables", "collect_runs",
    "format_csv", "format_markdown", "load_run", "parse_columns", "tables_to_json", "PAPER_TABLES",
    "plot_ap_vs_images_per_gpu", "RunFileError", "describe_run", "load_results",
    "load_run_status", "save_results", "write_run_status",
]
