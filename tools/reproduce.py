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

    python tools/reproduce.py synthetic-study --jobs 2 --threads 1   # the study, ~2.5 h on 2 cores
    python tools/reproduce.py synthetic-study --dry-run              # only print the commands

synthetic-study trains from scratch on the synthetic shapes set (128 px, 3 classes) Mask R-CNN
R18-FPN with BN, GN, GNWS, FRN and NF and RetinaNet R18-FPN with BN, GN and FRN, each at 1, 2, 4
and 8 images per batch, each run one process (images per GPU = images per batch; --jobs runs
that many cells side by side, --threads sets each one's OMP threads), following the FRN
paper's protocol scaled down: every batch size sees the same number of images (epochs), lr is
scaled linearly with the batch, warm-up, lr steps and checkpoints are measured in images, one seed
for every cell (rules: study_schedule below; sizing: docs/study_synthetic.md). Runs go to
output/synthetic-study/<detector>_R18_FPN_<norm>_<n>img; finished runs are skipped, interrupted
ones resumed, a diverged run (train_net exit 1, run_status.json "failed" with a non-finite loss or
weight) is a result: recorded as diverged (study_cells.json), shown as failed in the table, never
retried; so is a BN run that cannot normalize a single value per channel ("no batch
statistics": one image and a 1x1 feature map). Then tools/ap_table.py writes the tables
(output/synthetic-study/ap_table.md) and tools/plot_ap.py the plots docs/study_synthetic.png
(box AP against images per batch) and docs/study_synthetic_mask.png (Mask R-CNN's mask AP).

    python tools/reproduce.py batch-study --jobs 2 --threads 1           # ~2.3 h on 2 cores
    python tools/reproduce.py batch-study --jobs 2 --threads 1 --quick   # smaller, ~1.1 h

batch-study (issue 23, docs/study_batch.md) holds everything but BN's statistics fixed: RetinaNet
R18-FPN at 160 px on synthetic_varied (per-image statistics that vary), one total batch of 8 on
one process, one lr / warm-up / cosine schedule for all; BN with statistics over 8, 4, 2, 1
images (BN_IMG<k>, PreciseBN before each evaluation) and GN, GNWS, FRN (eps by
recipes.frn_variant) and NF as controls, seeds 1 and 2 (16 runs), 6 evaluations per run. Same
resumability and result states as synthetic-study; at the end tools/ap_table.py and
tools/study_curves.py (FRN-Table-6-layout table, AP-vs-iteration curves docs/study_batch.png).
"""
import argparse
import glob
import json
import os
import shlex
import subprocess
import sys
import time
from typing import Dict, List, NamedTuple, Optional, Sequence, Tuple

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from d2_norms.recipes import PAPER_TABLES, config_name  # noqa: E402

SYNTHETIC_STUDY = "synthetic-study"
BATCH_STUDY = "batch-study"


def run_dir(name: str) -> str:
    return os.path.join(REPO, "output", "COCO-scratch", name[: -len(".yaml")])


def state_of(directory: str) -> str:
    try:
        with open(os.path.join(directory, "run_status.json")) as f:
            return json.load(f).get("state", "unknown")
    except (OSError, ValueError):
        return "new"


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if SYNTHETIC_STUDY in argv:
        argv.remove(SYNTHETIC_STUDY)
        return study_main(argv)
    if BATCH_STUDY in argv:
        argv.remove(BATCH_STUDY)
        return batch_study_main(argv)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("table", choices=sorted(PAPER_TABLES) + [SYNTHETIC_STUDY, BATCH_STUDY],
                        help=f"a paper table, or {SYNTHETIC_STUDY} / {BATCH_STUDY} (own "
                        f"options: {SYNTHETIC_STUDY} --help, {BATCH_STUDY} --help)")
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


# ============================================================================ synthetic-study
# The batch-size study on the synthetic shapes set (docs/study_synthetic.md: sizing, timings).
STUDY_ROOT = os.path.join(REPO, "output", "synthetic-study")
STUDY_PLOT = os.path.join(REPO, "docs", "study_synthetic.png")
STUDY_STATUS_FILE = "study_cells.json"
STUDY_TABLE_FILE = "ap_table.md"
STUDY_CONSOLE_FILE = "console.txt"  # a run's console output with --jobs > 1
STUDY_BATCHES = (1, 2, 4, 8)
# Every image count of the schedule is a multiple of the largest batch, so that every batch size
# sees exactly the same number of images (iterations x batch), warms up and steps after exactly
# the same images; it does not depend on which cells a command selects.
STUDY_IMAGE_QUANTUM = 8
# Images seen by every cell: STUDY_EPOCHS x the 1000 training images (a nominal epoch: the
# loader drops the ~10% images without objects, so one pass over the usable images is ~900).
# Sized so that the 32 runs fit ~3.5 h on 2 cores (measurements: docs/study_synthetic.md).
STUDY_EPOCHS = 1.0
# lr = STUDY_REFERENCE_LR x batch / STUDY_REFERENCE_BATCH (linear scaling; `make demo`'s 0.02
# at 4 images, for both detectors).
STUDY_REFERENCE_BATCH = 4
STUDY_REFERENCE_LR = 0.02
STUDY_WARMUP_IMAGES = 200  # the demo's 50 iterations x 4 images
STUDY_CHECKPOINT_IMAGES = 400  # resume granularity; intermediate checkpoints pruned at the end
STUDY_PRECISE_BN_IMAGES = 200  # PreciseBN (BN Mask R-CNN, d2_norms.recipes) re-estimates on these
STUDY_SEED = 1
STUDY_TRAIN_SET = "synthetic_shapes_train"
STUDY_TEST_SET = "synthetic_shapes_val"
DIVERGED_ERRORS = ("NonFiniteLossError", "NonFiniteWeightsError")
# BN given a single value per channel (one image and a 1x1 feature map, e.g. RetinaNet's P7 on
# 128 px images): torch refuses to normalize. That is BN's batch dependence at its limit, a
# result of the study like a divergence, not a bug to fix and resume.
NO_BATCH_STATISTICS_ERRORS = ("ValueError: Expected more than 1 value per channel when training",)
RESULT_STATES = ("diverged", "no batch statistics")


class StudyDetector(NamedTuple):
    config: str  # base config, relative to the repository
    norms: Tuple[str, ...]
    lr_scheduler: str
    warmup_method: str
    step_fractions: Tuple[float, ...]  # lr x0.1 after these fractions of the images
    fixed: Tuple[Tuple[str, object], ...]  # further settings of every cell of the detector


STUDY_DETECTORS: Dict[str, StudyDetector] = {
    # GN paper's Mask R-CNN schedule as `make demo` (steps after 75% and 92.5%, linear warm-up);
    # 64 sampled ROIs per image as the demo (at most 4 objects per image; 1.49 -> 0.92 s/it).
    "mask_rcnn": StudyDetector(
        "configs/synthetic/mask_rcnn_R18_FPN_GN.yaml", ("BN", "GN", "GNWS", "FRN", "NF"),
        "WarmupMultiStepLR", "linear", (0.75, 0.925),
        (("MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", 64),)),
    # FRN paper sec. 4.1 / 4.3: cosine decay to 0, cosine warm-up ramp.
    "retinanet": StudyDetector(
        "configs/synthetic/retinanet_R18_FPN_GN.yaml", ("BN", "GN", "FRN"),
        "WarmupCosineLR", "cosine", (), ()),
}
# Every normalization key of each detector: the study sets all of them on every command line.
STUDY_NORM_KEYS = {
    "mask_rcnn": ("MODEL.RESNETS.NORM", "MODEL.FPN.NORM", "MODEL.RPN.NORM",
                  "MODEL.ROI_BOX_HEAD.NORM", "MODEL.ROI_MASK_HEAD.NORM"),
    "retinanet": ("MODEL.RESNETS.NORM", "MODEL.FPN.NORM", "MODEL.RETINANET.NORM"),
}


class StudyCell(NamedTuple):
    detector: str
    norm: str
    ims: int  # images per batch (one process: images per GPU)

    @property
    def name(self) -> str:
        return f"{self.detector}_R18_FPN_{self.norm}_{self.ims}img"


def study_cells(detectors: Optional[Sequence[str]] = None, norms: Optional[Sequence[str]] = None,
                batches: Optional[Sequence[int]] = None) -> List[StudyCell]:
    """The cells in run order (detector, batch, normalizer); ``None`` selects all."""
    detectors = list(detectors or STUDY_DETECTORS)
    batches = list(batches or STUDY_BATCHES)
    for d in detectors:
        if d not in STUDY_DETECTORS:
            raise ValueError(f"unknown detector {d!r}; the study has {sorted(STUDY_DETECTORS)}")
    for b in batches:
        if b not in STUDY_BATCHES:
            raise ValueError(f"images per batch {b} is not one of the study's {STUDY_BATCHES}")
    if norms:
        known = {n for d in detectors for n in STUDY_DETECTORS[d].norms}
        unknown = [n for n in norms if n not in known]
        if unknown:
            raise ValueError(f"normalizer(s) {unknown} not in the study of {detectors} "
                             f"({sorted(known)})")
    return [StudyCell(d, n, b) for d in detectors for b in batches
            for n in STUDY_DETECTORS[d].norms if not norms or n in norms]


def study_images(epochs: float, train_images: int) -> int:
    """Images every cell trains on: epochs x training images, a multiple of the largest batch."""
    images = epochs * train_images
    if epochs <= 0 or abs(images - round(images)) > 1e-6 or round(images) % STUDY_IMAGE_QUANTUM:
        q = STUDY_IMAGE_QUANTUM
        near = max(q, round(images / q) * q)
        raise ValueError(
            f"{epochs:g} epochs of {train_images} images = {images:g} images: the study needs a "
            f"positive multiple of {q} (the largest batch) so that every batch size sees the "
            f"same images; e.g. --epochs {near / train_images:g} ({near} images)")
    return int(round(images))


def _images_to_iters(images: int, ims: int, what: str) -> int:
    if images % ims:
        raise ValueError(f"{what}: {images} images is not a whole number of batches of {ims}")
    return images // ims


def study_schedule(detector: str, ims: int, images: int,
                   warmup_images: int = STUDY_WARMUP_IMAGES) -> Dict[str, object]:
    """SOLVER values of one cell: the same images, warm-up images, lr-step images and checkpoint
    images at every batch size, lr linear in the batch."""
    spec = STUDY_DETECTORS[detector]
    q = STUDY_IMAGE_QUANTUM
    # (a short test schedule may round two steps onto one image count, or onto 0: kept once /
    # dropped, as a scheduler needs increasing milestones inside the run)
    step_images = sorted({int(f * images) // q * q for f in spec.step_fractions} - {0})
    return {
        "SOLVER.IMS_PER_BATCH": ims,
        "SOLVER.REFERENCE_WORLD_SIZE": 0,  # one process, no auto-scaling
        "SOLVER.BASE_LR": STUDY_REFERENCE_LR * ims / STUDY_REFERENCE_BATCH,
        "SOLVER.MAX_ITER": _images_to_iters(images, ims, "training"),
        "SOLVER.LR_SCHEDULER_NAME": spec.lr_scheduler,
        "SOLVER.STEPS": tuple(_images_to_iters(s, ims, "lr step") for s in step_images),
        "SOLVER.WARMUP_METHOD": spec.warmup_method,
        "SOLVER.WARMUP_ITERS": _images_to_iters(warmup_images, ims, "warm-up"),
        "SOLVER.CHECKPOINT_PERIOD": max(1, STUDY_CHECKPOINT_IMAGES // ims),
    }


def study_norm_settings(detector: str, norm: str) -> Dict[str, object]:
    """Every NORM key of the detector (d2_norms.recipes.norm_fields; the RPN head unnormalized
    except for NF) and the recipe's per-normalizer extras: AGC for NF, PreciseBN for BN Mask
    R-CNN (d2_norms.recipes.extra_fields; its COCO input sizes are not taken)."""
    from d2_norms.recipes import extra_fields, norm_fields

    fields = {key: "" for key in STUDY_NORM_KEYS[detector]}
    fields.update(norm_fields(detector, norm))
    if set(fields) != set(STUDY_NORM_KEYS[detector]):
        raise AssertionError(f"norm keys {sorted(fields)} != {STUDY_NORM_KEYS[detector]}")
    fields.update({k: v for k, v in extra_fields(detector, norm).items()
                   if not k.startswith("INPUT.")})
    if detector == "retinanet":
        # As the study ran (issue 14), before the recipe gave RetinaNet BN cells PreciseBN
        # (issue 23): re-running the command reproduces the published runs.
        fields.pop("TEST.PRECISE_BN.ENABLED", None)
    return fields


def study_overrides(cell: StudyCell, images: int, output_dir: str, *,
                    warmup_images: int = STUDY_WARMUP_IMAGES, seed: int = STUDY_SEED,
                    device: str = "cpu", train_set: str = STUDY_TRAIN_SET,
                    test_set: str = STUDY_TEST_SET) -> Dict[str, object]:
    """KEY -> value of one cell's command line, in order."""
    flat: Dict[str, object] = {}
    flat.update(study_norm_settings(cell.detector, cell.norm))
    flat.update(dict(STUDY_DETECTORS[cell.detector].fixed))
    flat.update(study_schedule(cell.detector, cell.ims, images, warmup_images))
    if flat.get("TEST.PRECISE_BN.ENABLED"):  # statistics re-estimated on the same images
        flat["TEST.PRECISE_BN.NUM_ITER"] = _images_to_iters(STUDY_PRECISE_BN_IMAGES, cell.ims,
                                                            "PreciseBN")
    flat["SEED"] = seed
    flat["MODEL.DEVICE"] = device
    flat["DATASETS.TRAIN"] = (train_set,)
    flat["DATASETS.TEST"] = (test_set,)
    flat["OUTPUT_DIR"] = output_dir
    return flat


def format_override(value) -> str:
    """A value as detectron2's merge_from_list reads it back (literal_eval, else the string)."""
    if isinstance(value, bool) or isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return repr(float(f"{value:.10g}"))
    if isinstance(value, tuple):
        inner = ", ".join(repr(v) for v in value)
        return f"({inner},)" if len(value) == 1 else f"({inner})"
    return str(value)


def study_command(cell: StudyCell, overrides: Dict[str, object], resume: bool,
                  extra_opts: Sequence[str] = ()) -> List[str]:
    cmd = [sys.executable, os.path.join(REPO, "tools", "train_net.py"), "--num-gpus", "1",
           "--config-file", os.path.join(REPO, STUDY_DETECTORS[cell.detector].config)]
    if resume:
        cmd.append("--resume")
    for key, value in overrides.items():
        cmd += [key, format_override(value)]
    return cmd + list(extra_opts)


def read_run_status(directory: str) -> Dict:
    try:
        with open(os.path.join(directory, "run_status.json")) as f:
            status = json.load(f)
        return status if isinstance(status, dict) else {}
    except (OSError, ValueError):
        return {}


def cell_state(directory: str) -> str:
    """"new", "running" (or killed), "failed", "diverged" (failed on a non-finite loss or
    weights: a result of the study) or "finished"."""
    status = read_run_status(directory)
    state = status.get("state", "new")
    if state == "failed":
        error = str(status.get("error", ""))
        if error.startswith(DIVERGED_ERRORS):
            return "diverged"
        if error.startswith(NO_BATCH_STATISTICS_ERRORS):
            return "no batch statistics"
    return state if state in ("running", "failed", "finished") else "new"


def prune_checkpoints(directory: str) -> List[str]:
    """Remove the intermediate model_<iter>.pth of a finished run (model_final.pth stays)."""
    if not os.path.exists(os.path.join(directory, "model_final.pth")):
        return []
    removed = sorted(glob.glob(os.path.join(directory, "model_[0-9]*.pth")))
    for path in removed:
        os.remove(path)
    return removed


def _start(cmd: List[str], env: Optional[Dict[str, str]], log: Optional[str]):
    """Start one training process (console output to ``log`` when given)."""
    if log is None:
        return subprocess.Popen(cmd, env=env)
    with open(log, "ab") as f:
        return subprocess.Popen(cmd, env=env, stdout=f, stderr=subprocess.STDOUT)


def _wait_any(running: List[Tuple]) -> Tuple:
    """Remove and return the first (process, ...) of ``running`` to finish."""
    while True:
        for i, item in enumerate(running):
            if item[0].poll() is not None:
                return running.pop(i)
        if len(running) == 1:
            running[0][0].wait()
        else:
            time.sleep(1.0)


def train_set_size(name: str) -> int:
    from detectron2.data import MetadataCatalog

    import d2_norms.data  # noqa: F401  (registers the synthetic sets)

    spec = getattr(MetadataCatalog.get(name), "synthetic_spec", None)
    if not spec:
        raise ValueError(f"{name} is not a registered synthetic set: give --train-images")
    return int(spec["num_images"])


def _write_study_status(root: str, outcomes: Dict[str, Dict]) -> None:
    from d2_norms.fileio import atomic_write_text

    atomic_write_text(os.path.join(root, STUDY_STATUS_FILE),
                      json.dumps(outcomes, indent=2, sort_keys=True) + "\n")


def _read_study_status(root: str) -> Dict[str, Dict]:
    try:
        with open(os.path.join(root, STUDY_STATUS_FILE)) as f:
            data = json.load(f)
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def queue_cells(cells, root: str, args, command_for):
    """The study cells still to train: (run dirs of every cell, queue of (cell, dir, command),
    env, printed env prefix). Finished cells and recorded results (divergence, no batch
    statistics) are skipped with a line each; interrupted ones resume; ``--dry-run`` prints the
    commands instead of queueing them. ``command_for(cell, out_dir, resume)`` builds one."""
    env = None
    if args.threads > 0:
        env = dict(os.environ, OMP_NUM_THREADS=str(args.threads),
                   MKL_NUM_THREADS=str(args.threads))
    prefix = f"OMP_NUM_THREADS={args.threads} MKL_NUM_THREADS={args.threads} " if env else ""
    dirs, queue = [], []
    for cell in cells:
        out = os.path.join(root, cell.name)
        dirs.append(out)
        state = cell_state(out)
        if state == "finished":
            print(f"[done]     {cell.name}")
            continue
        if state in RESULT_STATES:
            print(f"[{state}] {cell.name}: {read_run_status(out).get('error', '')[:200]} "
                  "(a result; delete the directory to train it again)")
            continue
        cmd = command_for(cell, out, state in ("running", "failed"))
        if args.dry_run:
            print("[dry-run]  " + prefix + shlex.join(cmd), flush=True)
        else:
            queue.append((cell, out, cmd))
    return dirs, queue, env, prefix


def print_result_cells(cells, root: str) -> None:
    """One line per result state (diverged, no batch statistics) naming its cells."""
    for result in RESULT_STATES:
        names = [c.name for c in cells if cell_state(os.path.join(root, c.name)) == result]
        if names:
            print(f"{result} ({len(names)}): {', '.join(names)}")


def run_queue(queue: List[Tuple], jobs: int, env: Optional[Dict[str, str]], prefix: str,
              root: str, outcomes: Dict[str, Dict], describe, *,
              keep_checkpoints: bool = False) -> Optional[int]:
    """Train ``queue``'s (cell, run dir, command) ``jobs`` at a time; record each outcome
    (``describe(cell)`` + exit code and outcome) in ``root``'s study_cells.json. Diverged / "no
    batch statistics" runs are results; any other failure starts nothing more, lets the running
    ones finish and returns its exit code (None: every run ended as a result)."""
    running, failed = [], None
    while queue or running:
        while queue and failed is None and len(running) < jobs:
            cell, out, cmd = queue.pop(0)
            log = None
            if jobs > 1:  # several trainings at once: each one's console output to a file
                os.makedirs(out, exist_ok=True)
                log = os.path.join(out, STUDY_CONSOLE_FILE)
            print("[train]    " + prefix + shlex.join(cmd)
                  + (f"  > {os.path.relpath(log, root)}" if log else ""), flush=True)
            running.append((_start(cmd, env, log), cell, out))
        if not running:
            break
        proc, cell, out = _wait_any(running)
        code = proc.returncode
        state = cell_state(out)
        outcomes[cell.name] = dict(describe(cell), exit_code=code, outcome=state)
        _write_study_status(root, outcomes)
        if code == 0 and state == "finished":
            print(f"[finished] {cell.name}", flush=True)
            if not keep_checkpoints:
                prune_checkpoints(out)
        elif code == 1 and state in RESULT_STATES:
            print(f"[{state}] {cell.name}: {read_run_status(out).get('error', '')[:200]}; "
                  "recorded, the study goes on", flush=True)
        else:
            print(f"error: {cell.name} failed (exit {code}, run state {state}); fix it and run "
                  "this command again to resume"
                  + (" (waiting for the runs in progress)" if running else ""), file=sys.stderr,
                  flush=True)
            failed = failed or code or 1
    return failed


def study_main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(
        prog=f"reproduce.py {SYNTHETIC_STUDY}",
        description="The batch-size study on the synthetic shapes set (see the module docstring).")
    parser.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    parser.add_argument("--detectors", nargs="+", choices=sorted(STUDY_DETECTORS),
                        help="default: both")
    parser.add_argument("--norms", nargs="+", help="default: each detector's normalizers")
    parser.add_argument("--batches", nargs="+", type=int, help=f"default: {STUDY_BATCHES}")
    parser.add_argument("--epochs", type=float, default=STUDY_EPOCHS,
                        help="images per cell = epochs x training images "
                        f"(default {STUDY_EPOCHS:g})")
    parser.add_argument("--warmup-images", type=int, default=STUDY_WARMUP_IMAGES)
    parser.add_argument("--seed", type=int, default=STUDY_SEED)
    parser.add_argument("--device", default="cpu", help="MODEL.DEVICE (default cpu)")
    parser.add_argument("--train-set", default=STUDY_TRAIN_SET)
    parser.add_argument("--test-set", default=STUDY_TEST_SET)
    parser.add_argument("--train-images", type=int,
                        help="size of --train-set (default: read from its registration)")
    parser.add_argument("--output-root", default=STUDY_ROOT)
    parser.add_argument("--plot", help=f"the PNG (default {os.path.relpath(STUDY_PLOT, REPO)} "
                        "for the default --output-root, else OUTPUT_ROOT/study_synthetic.png)")
    parser.add_argument("--threads", type=int, default=0,
                        help="OMP/MKL threads of each training process (default 0: torch's "
                        "default, one per core); 1 on a machine other work shares: 2 threads on "
                        "2 busy cores ran ~10x slower than 1 (docs/study_synthetic.md)")
    parser.add_argument("--jobs", type=int, default=1,
                        help="cells trained at once, each its own process (default 1); with "
                        "--threads 1, --jobs 2 keeps both cores busy without two threads "
                        "fighting for one core (docs/study_synthetic.md)")
    parser.add_argument("--keep-checkpoints", action="store_true",
                        help="keep the intermediate model_<iter>.pth of finished runs")
    parser.add_argument("opts", nargs="*", help="further overrides for every run: KEY VALUE ...")
    args = parser.parse_intermixed_args(argv)
    try:
        cells = study_cells(args.detectors, args.norms, args.batches)
        train_images = args.train_images or train_set_size(args.train_set)
        images = study_images(args.epochs, train_images)
        for cell in cells:  # every schedule is valid before anything runs
            study_schedule(cell.detector, cell.ims, images, args.warmup_images)
        if args.jobs < 1:
            raise ValueError(f"--jobs must be >= 1, got {args.jobs}")
    except ValueError as e:
        parser.error(str(e))
    root = os.path.abspath(args.output_root)
    plot = args.plot or (STUDY_PLOT if root == os.path.abspath(STUDY_ROOT)
                         else os.path.join(root, "study_synthetic.png"))
    print(f"{SYNTHETIC_STUDY}: {len(cells)} runs, {images} images each ({args.epochs:g} epoch(s) "
          f"of {args.train_set}), lr {STUDY_REFERENCE_LR:g} x batch / {STUDY_REFERENCE_BATCH}, "
          f"warm-up {args.warmup_images} images, seed {args.seed}, {args.device}"
          + (f" ({args.threads} thread(s))" if args.threads > 0 else "") + "; runs in "
          f"{root}", flush=True)
    outcomes = _read_study_status(root)
    dirs, queue, env, prefix = queue_cells(
        cells, root, args, lambda cell, out, resume: study_command(cell, study_overrides(
            cell, images, out, warmup_images=args.warmup_images, seed=args.seed,
            device=args.device, train_set=args.train_set, test_set=args.test_set),
            resume=resume, extra_opts=args.opts))

    failed = run_queue(queue, args.jobs, env, prefix, root, outcomes, lambda cell: {
        "detector": cell.detector, "norm": cell.norm, "images_per_batch": cell.ims,
        "images": images, "threads": args.threads or "default", "jobs": args.jobs},
        keep_checkpoints=args.keep_checkpoints)
    if failed is not None:
        return failed
    tools = os.path.join(REPO, "tools")
    table_path = os.path.join(root, STUDY_TABLE_FILE)
    table = [sys.executable, os.path.join(tools, "ap_table.py"), *dirs, "-o", table_path]
    figures = [[sys.executable, os.path.join(tools, "plot_ap.py"), *dirs, "-o", plot]]
    mask_plot = None
    if any(c.detector == "mask_rcnn" for c in cells):  # mask AP too: GN Table 7's other half
        mask_plot = os.path.splitext(plot)[0] + "_mask.png"
        figures.append(figures[0][:-1] + [mask_plot, "--task", "segm"])
    if args.dry_run:
        for cmd in [table, *figures]:
            print("[dry-run]  " + shlex.join(cmd))
        return 0
    code = subprocess.call(table)
    if os.path.exists(table_path):
        with open(table_path) as f:
            sys.stdout.write(f.read())
        print(f"table: {table_path}")
    for cmd in figures:
        code = max(code, subprocess.call(cmd))
    print_result_cells(cells, root)
    print(f"plot: {plot}" + (f" (box AP), {mask_plot} (mask AP)" if mask_plot else ""))
    return code

# ============================================================================ batch-study
# Issue 23's study that holds everything but BN's statistics fixed (docs/study_batch.md): one
# total batch of 8 images on one process, one schedule, lr and warm-up for every cell; BN with
# statistics over 8, 4, 2 and 1 images (BN_IMG<k>, d2_norms.layers.ghost_batch_norm: per-GPU BN
# at k images per GPU, emulated), and the batch-independent normalizers once each as controls;
# 2 seeds per cell; evaluated periodically on 500 validation images whose per-image statistics
# vary (synthetic_varied, d2_norms.data).
BATCH_ROOT = os.path.join(REPO, "output", BATCH_STUDY)
BATCH_PLOT = os.path.join(REPO, "docs", "study_batch.png")
BATCH_CONFIG = "configs/synthetic/retinanet_R18_FPN_GN.yaml"
BATCH_DETECTOR = "retinanet"
BATCH_IMS = 8  # total batch = per-device batch (one process)
BATCH_GROUPS = (8, 4, 2, 1)  # images per BN statistics group
BATCH_IMAGE_SIZE = 160  # P7 2x2: BN at one image still has 4 values per channel
BATCH_CONTROLS = ("GN", "GNWS", "FRN", "NF")  # "FRN": d2_norms.recipes.frn_variant decides eps
BATCH_SEEDS = (1, 2)
# One lr for every cell: synthetic-study's 0.02 x batch / 4 at batch 8 (every normalizer trained
# at it there, none diverged); FRN sec. 4.1 cosine warm-up, cosine decay to 0.
BATCH_LR = 0.04
BATCH_WARMUP_ITERS = 100
# Sized by the pilot (docs/study_batch.md "Sizing"): 16 runs in ~2.3 h at --jobs 2 --threads 1
# on 2 quiet cores (~1.1 CPU s per iteration, ~35 s per evaluation of the 500 images).
BATCH_ITERATIONS = 600  # 4800 images = 2.4 passes over the 2000 training images
BATCH_EVALS = 6  # evaluations per run (TEST.EVAL_PERIOD = iterations / 6): the curves
# --quick: ~1.1 h, a smaller study: 240 iterations, 4 evaluations (its curves stop earlier).
BATCH_QUICK_ITERATIONS = 240
BATCH_QUICK_EVALS = 4
BATCH_PRECISE_BN_ITERS = 25  # PreciseBN before each evaluation: 200 training images
BATCH_TRAIN_SET = "synthetic_varied_train"
BATCH_TEST_SET = "synthetic_varied_val"
BATCH_CURVES_TOOL = os.path.join("tools", "study_curves.py")


class BatchCell(NamedTuple):
    norm: str  # a registered name: BN_IMG<k> or a control
    seed: int

    @property
    def name(self) -> str:
        return f"{BATCH_DETECTOR}_R18_FPN_{self.norm}_{BATCH_IMS}img_seed{self.seed}"

    @property
    def detector(self) -> str:  # for study_cells.json, as synthetic-study's cells
        return BATCH_DETECTOR


def batch_norms(groups: Optional[Sequence[int]] = None, controls: Optional[Sequence[str]] = None,
                image_size: int = BATCH_IMAGE_SIZE) -> List[str]:
    """BN_IMG<k> for each group size, then the controls (FRN as the FRN eps rule picks it)."""
    from d2_norms.recipes import frn_variant, smallest_map_side

    groups = list(BATCH_GROUPS if groups is None else groups)
    controls = list(BATCH_CONTROLS if controls is None else controls)
    for k in groups:
        if k not in BATCH_GROUPS:
            raise ValueError(f"images per BN group {k} is not one of {BATCH_GROUPS}")
    for c in controls:
        if c not in BATCH_CONTROLS:
            raise ValueError(f"control {c!r} is not one of {BATCH_CONTROLS}")
    frn = frn_variant(smallest_map_side(BATCH_DETECTOR, image_size))
    return [f"BN_IMG{k}" for k in groups] + [frn if c == "FRN" else c for c in controls]


def batch_cells(groups=None, controls=None, seeds: Optional[Sequence[int]] = None,
                image_size: int = BATCH_IMAGE_SIZE) -> List[BatchCell]:
    """The runs in order: seed by seed (a stopped study has whole seeds), each normalizer."""
    seeds = list(BATCH_SEEDS if seeds is None else seeds)
    return [BatchCell(n, s) for s in seeds for n in batch_norms(groups, controls, image_size)]


def batch_overrides(cell: BatchCell, iterations: int, output_dir: str, *,
                    image_size: int = BATCH_IMAGE_SIZE, evals: int = BATCH_EVALS,
                    device: str = "cpu", train_set: str = BATCH_TRAIN_SET,
                    test_set: str = BATCH_TEST_SET) -> Dict[str, object]:
    """KEY -> value of one run's command line: only the normalizer's keys (and its recipe
    extras: PreciseBN for BN, AGC for NF) and the seed differ between runs."""
    from d2_norms.recipes import normalizer_fields

    if iterations < 1 or evals < 1 or iterations % evals:
        raise ValueError(f"--iterations {iterations} must be a positive multiple of the "
                         f"{evals} evaluations per run (e.g. {max(evals, iterations // evals * evals)})")
    if iterations <= BATCH_WARMUP_ITERS:
        raise ValueError(f"--iterations {iterations} must exceed the {BATCH_WARMUP_ITERS} "
                         "warm-up iterations")
    flat: Dict[str, object] = dict(normalizer_fields(BATCH_DETECTOR, cell.norm))
    if flat.get("TEST.PRECISE_BN.ENABLED"):
        flat["TEST.PRECISE_BN.NUM_ITER"] = BATCH_PRECISE_BN_ITERS
    period = iterations // evals
    flat.update({
        "INPUT.MIN_SIZE_TRAIN": (image_size,), "INPUT.MAX_SIZE_TRAIN": image_size,
        "INPUT.MIN_SIZE_TEST": image_size, "INPUT.MAX_SIZE_TEST": image_size,
        "SOLVER.IMS_PER_BATCH": BATCH_IMS,
        "SOLVER.REFERENCE_WORLD_SIZE": 0,  # one process, no auto-scaling
        "SOLVER.BASE_LR": BATCH_LR,
        "SOLVER.MAX_ITER": iterations,
        "SOLVER.LR_SCHEDULER_NAME": "WarmupCosineLR",
        "SOLVER.STEPS": (),
        "SOLVER.WARMUP_METHOD": "cosine",
        "SOLVER.WARMUP_ITERS": BATCH_WARMUP_ITERS,
        "SOLVER.CHECKPOINT_PERIOD": period,
        "TEST.EVAL_PERIOD": period,
        "SEED": cell.seed,
        "MODEL.DEVICE": device,
        "DATASETS.TRAIN": (train_set,),
        "DATASETS.TEST": (test_set,),
        "OUTPUT_DIR": output_dir,
    })
    return flat


def batch_command(overrides: Dict[str, object], resume: bool,
                  extra_opts: Sequence[str] = ()) -> List[str]:
    cmd = [sys.executable, os.path.join(REPO, "tools", "train_net.py"), "--num-gpus", "1",
           "--config-file", os.path.join(REPO, BATCH_CONFIG)]
    if resume:
        cmd.append("--resume")
    for key, value in overrides.items():
        cmd += [key, format_override(value)]
    return cmd + list(extra_opts)


def batch_study_main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(
        prog=f"reproduce.py {BATCH_STUDY}",
        description="Issue 23's study: BN with statistics over 8 / 4 / 2 / 1 images of one total "
        "batch of 8 against GN, GN+WS, FRN and NF, everything else fixed, 2 seeds, validation "
        "curves (docs/study_batch.md).")
    parser.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    parser.add_argument("--groups", nargs="+", type=int,
                        help=f"images per BN group (default {BATCH_GROUPS})")
    parser.add_argument("--controls", nargs="*", help=f"default {BATCH_CONTROLS}")
    parser.add_argument("--seeds", nargs="+", type=int, help=f"default {BATCH_SEEDS}")
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--iterations", type=int, default=None,
                      help=f"iterations per run (default {BATCH_ITERATIONS}: ~2.3 h at --jobs 2 "
                      f"--threads 1 on 2 quiet cores); a multiple of the {BATCH_EVALS} "
                      "evaluations per run. Changing it changes the cosine schedule: use a new "
                      "--output-root, runs of another length are not resumed into it")
    size.add_argument("--quick", action="store_true",
                      help=f"{BATCH_QUICK_ITERATIONS} iterations, {BATCH_QUICK_EVALS} "
                      "evaluations per run (~1.1 h): a smaller study, shorter curves; runs go to "
                      f"{os.path.relpath(BATCH_ROOT, REPO)}-quick")
    parser.add_argument("--image-size", type=int, default=BATCH_IMAGE_SIZE)
    parser.add_argument("--device", default="cpu", help="MODEL.DEVICE (default cpu)")
    parser.add_argument("--train-set", default=BATCH_TRAIN_SET)
    parser.add_argument("--test-set", default=BATCH_TEST_SET)
    parser.add_argument("--output-root", default=None,
                        help=f"default {os.path.relpath(BATCH_ROOT, REPO)} "
                        f"({os.path.relpath(BATCH_ROOT, REPO)}-quick with --quick)")
    parser.add_argument("--plot", help="the curves PNG (default docs/study_batch.png for the "
                        "default --output-root, else OUTPUT_ROOT/study_batch.png)")
    parser.add_argument("--threads", type=int, default=0, help="OMP/MKL threads of each "
                        "training process (default: torch's); 1 on a shared machine")
    parser.add_argument("--jobs", type=int, default=1, help="runs trained at once (default 1)")
    parser.add_argument("--keep-checkpoints", action="store_true",
                        help="keep the intermediate model_<iter>.pth of finished runs")
    parser.add_argument("opts", nargs="*", help="further overrides for every run: KEY VALUE ...")
    args = parser.parse_intermixed_args(argv)
    iterations = args.iterations or (BATCH_QUICK_ITERATIONS if args.quick else BATCH_ITERATIONS)
    evals = BATCH_QUICK_EVALS if args.quick else BATCH_EVALS
    default_root = BATCH_ROOT + ("-quick" if args.quick else "")
    root = os.path.abspath(args.output_root or default_root)
    plot = args.plot or (BATCH_PLOT if root == os.path.abspath(BATCH_ROOT)
                         else os.path.join(root, "study_batch.png"))
    try:
        cells = batch_cells(args.groups, args.controls, args.seeds, args.image_size)
        overrides = {c.name: batch_overrides(
            c, iterations, os.path.join(root, c.name), image_size=args.image_size, evals=evals,
            device=args.device, train_set=args.train_set, test_set=args.test_set) for c in cells}
        if args.jobs < 1:
            raise ValueError(f"--jobs must be >= 1, got {args.jobs}")
    except ValueError as e:
        parser.error(str(e))
    print(f"{BATCH_STUDY}: {len(cells)} runs of RetinaNet R18-FPN, {BATCH_IMS} images per "
          f"batch (one process), {iterations} iterations, lr {BATCH_LR:g} (cosine, warm-up "
          f"{BATCH_WARMUP_ITERS} it), {args.image_size} px, {evals} evaluations on "
          f"{args.test_set}, {args.device}"
          + (f" ({args.threads} thread(s))" if args.threads > 0 else "") + f"; runs in {root}",
          flush=True)
    outcomes = _read_study_status(root)
    dirs, queue, env, prefix = queue_cells(
        cells, root, args, lambda cell, out, resume: batch_command(
            overrides[cell.name], resume=resume, extra_opts=args.opts))
    failed = run_queue(queue, args.jobs, env, prefix, root, outcomes, lambda cell: {
        "norm": cell.norm, "seed": cell.seed, "images_per_batch": BATCH_IMS,
        "iterations": iterations, "threads": args.threads or "default", "jobs": args.jobs},
        keep_checkpoints=args.keep_checkpoints)
    if failed is not None:
        return failed
    table_path = os.path.join(root, STUDY_TABLE_FILE)
    reports = [
        [sys.executable, os.path.join(REPO, "tools", "ap_table.py"), *dirs, "-o", table_path],
        [sys.executable, os.path.join(REPO, BATCH_CURVES_TOOL), *dirs, "-o", plot,
         "--table", os.path.join(root, "batch_table.md"),
         "--csv", os.path.join(root, "batch_table.csv")],
    ]
    if args.dry_run:
        for cmd in reports:
            print("[dry-run]  " + shlex.join(cmd))
        return 0
    code = 0
    for cmd in reports:
        code = max(code, subprocess.call(cmd))
    for path in (table_path, os.path.join(root, "batch_table.md")):
        if os.path.exists(path):
            with open(path) as f:
                sys.stdout.write(f.read())
            print(f"table: {path}")
    print_result_cells(cells, root)
    print(f"plot: {plot}")
    return code


if __name__ == "__main__":
    sys.exit(main())
