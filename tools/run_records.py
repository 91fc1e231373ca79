#!/usr/bin/env python
"""Copy the records of run directories, without weights, to publish or archive them.

    python tools/run_records.py output/synthetic-study/*_*img -o docs/study_synthetic/runs

For each RUN_DIR this writes DEST/<run name>/ with the files tools/ap_table.py and
tools/plot_ap.py read (config.yaml, results.json, run_status.json, metrics.json) and nothing
else: no checkpoints, logs, events or predictions. Absolute paths into this repository (OUTPUT_DIR
in config.yaml, output_dir in results.json) become relative to it; any other absolute path of the
run directory becomes its name, so the copies name no machine. The copied directories are run
directories: `tools/ap_table.py DEST/*` prints the same table as the originals, and copied back
under an output root, a resumable tool (`tools/reproduce.py`) skips them as finished.

Each run is written to a temporary directory beside its destination and renamed into place, so
a copy is complete or absent; an existing DEST/<run name> is replaced. Runs still in progress
(run_status.json "running") are refused unless --include-running. Exit status: 0; 2 when a
RUN_DIR is not a run directory or is still running (nothing is written then).
"""
import argparse
import os
import shutil
import sys

import d2_norms  # noqa: F401
from d2_norms.evaluation.run_files import (RESULTS_FILE, RUN_STATUS_FILE, RunFileError,
                                           load_run_status)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECORD_FILES = ("config.yaml", RESULTS_FILE, RUN_STATUS_FILE, "metrics.json")
TEXT_WITH_PATHS = ("config.yaml", RESULTS_FILE)


def relative_text(text: str, run_dir: str) -> str:
    """Paths into the repository made relative to it; other absolute run-dir paths -> name."""
    run_dir = os.path.abspath(run_dir)
    text = text.replace(REPO + os.sep, "")
    return text.replace(run_dir, os.path.basename(run_dir))


def run_state(run_dir: str) -> str:
    """run_status.json's state (read by the evaluation package's reader, which raises
    RunFileError on a malformed file); without one, "finished" when there are results."""
    path = os.path.join(run_dir, RUN_STATUS_FILE)
    if not os.path.exists(path):
        return "finished" if os.path.exists(os.path.join(run_dir, RESULTS_FILE)) else "none"
    return load_run_status(path)["state"]


def copy_records(run_dir: str, dest_root: str) -> str:
    """Write DEST/<name>/ atomically (temporary sibling, then rename); return its path."""
    name = os.path.basename(os.path.normpath(run_dir))
    dest = os.path.join(dest_root, name)
    tmp = os.path.join(dest_root, f".{name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        for file in RECORD_FILES:
            src = os.path.join(run_dir, file)
            if not os.path.exists(src):
                continue
            if file in TEXT_WITH_PATHS:
                with open(src) as f:
                    text = relative_text(f.read(), run_dir)
                with open(os.path.join(tmp, file), "w") as f:
                    f.write(text)
            else:
                shutil.copyfile(src, os.path.join(tmp, file))
        if os.path.exists(dest):
            shutil.rmtree(dest)
        os.rename(tmp, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], epilog=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", metavar="RUN_DIR")
    p.add_argument("-o", "--output", required=True, metavar="DEST")
    p.add_argument("--include-running", action="store_true",
                   help="also copy runs whose run_status.json says running (a snapshot)")
    args = p.parse_args(argv)
    problems = []
    for run in args.runs:
        if not os.path.isfile(os.path.join(run, "config.yaml")):
            problems.append(f"{run}: not a run directory (no config.yaml)")
            continue
        try:
            state = run_state(run)
        except RunFileError as e:
            problems.append(str(e))
            continue
        if state == "running" and not args.include_running:
            problems.append(f"{run}: still running; wait for it or pass --include-running")
    if problems:
        for problem in problems:
            print(f"run_records: {problem}", file=sys.stderr)
        print("run_records: nothing written", file=sys.stderr)
        return 2
    os.makedirs(args.output, exist_ok=True)
    for run in args.runs:
        print(copy_records(run, args.output))
    return 0


if __name__ == "__main__":
    sys.exit(main())
