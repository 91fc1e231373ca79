"""tools/reproduce.py batch-study (issue 23): cells, the fixed protocol (only the normalizer and
seed differ between commands), the FRN eps rule, the PreciseBN rule, the report tool."""
import json
import os
import shlex
import subprocess
import sys

import pytest

from d2_norms import recipes

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "tools"))
import reproduce  # noqa: E402
import study_curves  # noqa: E402


def dry_run(*args):
    out = subprocess.run([sys.executable, os.path.join(REPO, "tools", "reproduce.py"),
                          "batch-study", "--dry-run", *args], capture_output=True, text=True,
                         cwd=REPO)
    assert out.returncode == 0, out.stderr
    return out.stdout


def parse(line):
    words = shlex.split(line.split("  ", 1)[1])
    start = words.index("--config-file") + 2
    if words[start] == "--resume":
        start += 1
    opts = words[start:]
    return dict(zip(opts[::2], opts[1::2]))


def test_the_rules():
    assert recipes.smallest_map_side("retinanet", 1024) == 8
    assert recipes.smallest_map_side("retinanet", 768) == 6  # a 4:3 COCO image at 1024
    assert recipes.smallest_map_side("retinanet", 160) == 2
    assert recipes.smallest_map_side("retinanet", 128) == 1
    assert recipes.smallest_map_side("mask_rcnn", 800) == 7
    assert recipes.smallest_map_side("mask_rcnn", 64) == 2
    assert [recipes.frn_variant(s) for s in (1, 2, 3, 8)] == ["FRN_LEPS", "FRN_LEPS", "FRN",
                                                              "FRN"]
    # COCO cells keep FRN; the batch study's 160 px RetinaNet gets learned eps
    assert recipes.frn_variant(recipes.smallest_map_side("retinanet", 1024)) == "FRN"
    assert recipes.frn_variant(recipes.smallest_map_side("mask_rcnn", 800)) == "FRN"
    with pytest.raises(ValueError):
        recipes.frn_variant(0)
    # PreciseBN: every BN / SyncBN cell and BN_IMG<k>, nothing else
    for det in recipes.DETECTORS:
        for norm in ("BN", "SyncBN", "BN_IMG1", "BN_IMG8"):
            assert recipes.uses_precise_bn(det, norm)
            assert recipes.normalizer_fields(det, norm)["TEST.PRECISE_BN.ENABLED"] is True
        for norm in ("GN", "GNWS", "FRN", "FRN_LEPS", "NF"):
            assert recipes.normalizer_fields(det, norm)["TEST.PRECISE_BN.ENABLED"] is False


def test_cells():
    cells = reproduce.batch_cells()
    assert [c.norm for c in cells] == ["BN_IMG8", "BN_IMG4", "BN_IMG2", "BN_IMG1", "GN", "GNWS",
                                       "FRN_LEPS", "NF"] * 2
    assert [c.seed for c in cells] == [1] * 8 + [2] * 8
    assert len({c.name for c in cells}) == 16
    # at COCO-like sizes the FRN control would be plain FRN
    assert reproduce.batch_norms(controls=["FRN"], groups=[], image_size=1024) == ["FRN"]
    with pytest.raises(ValueError):
        reproduce.batch_cells(groups=[3])


def test_every_command_holds_everything_but_the_normalizer_fixed(tmp_path):
    out = dry_run("--output-root", str(tmp_path), "--threads", "1")
    lines = [l for l in out.splitlines() if l.startswith("[dry-run]") and "train_net.py" in l]
    assert len(lines) == 16 and all("OMP_NUM_THREADS=1" in l for l in lines)
    runs = [parse(l) for l in lines]
    norm_keys = {"MODEL.RESNETS.NORM", "MODEL.FPN.NORM", "MODEL.RETINANET.NORM",
                 "MODEL.RETINANET.NORM_PER_LEVEL", "TEST.PRECISE_BN.ENABLED",
                 "TEST.PRECISE_BN.NUM_ITER", "SOLVER.CLIP_GRADIENTS.ENABLED",
                 "SOLVER.CLIP_GRADIENTS.CLIP_TYPE", "SOLVER.CLIP_GRADIENTS.CLIP_VALUE",
                 "SEED", "OUTPUT_DIR"}
    fixed = [{k: v for k, v in r.items() if k not in norm_keys} for r in runs]
    assert all(f == fixed[0] for f in fixed)
    f = fixed[0]
    assert (f["SOLVER.IMS_PER_BATCH"], f["SOLVER.REFERENCE_WORLD_SIZE"], f["SOLVER.BASE_LR"],
            f["SOLVER.MAX_ITER"], f["SOLVER.WARMUP_ITERS"], f["TEST.EVAL_PERIOD"]) == (
        "8", "0", "0.04", str(reproduce.BATCH_ITERATIONS), "100",
        str(reproduce.BATCH_ITERATIONS // reproduce.BATCH_EVALS))
    assert f["INPUT.MIN_SIZE_TRAIN"] == "(160,)" and f["INPUT.MAX_SIZE_TEST"] == "160"
    assert f["DATASETS.TRAIN"] == "('synthetic_varied_train',)"
    assert f["DATASETS.TEST"] == "('synthetic_varied_val',)"
    for r in runs:
        norm = r["MODEL.RESNETS.NORM"]
        assert r["MODEL.FPN.NORM"] == r["MODEL.RETINANET.NORM"] == norm
        bn = norm.startswith("BN_IMG")
        assert r["TEST.PRECISE_BN.ENABLED"] == str(bn)
        assert (r.get("TEST.PRECISE_BN.NUM_ITER") == "25") == bn
        assert (r.get("SOLVER.CLIP_GRADIENTS.CLIP_TYPE") == "agc") == (norm == "NF")
        assert r["MODEL.RETINANET.NORM_PER_LEVEL"] == str(norm != "NF")
        assert r["OUTPUT_DIR"].startswith(str(tmp_path))
    assert [r["SEED"] for r in runs] == ["1"] * 8 + ["2"] * 8
    # the reports at the end
    assert "ap_table.py" in out and "study_curves.py" in out


def test_quick_and_iterations():
    out = dry_run("--quick", "--seeds", "1", "--controls")
    runs = [parse(l) for l in out.splitlines() if "train_net.py" in l]
    assert len(runs) == 4
    assert {r["SOLVER.MAX_ITER"] for r in runs} == {str(reproduce.BATCH_QUICK_ITERATIONS)}
    assert all("batch-study-quick" in r["OUTPUT_DIR"] for r in runs)
    bad = subprocess.run([sys.executable, os.path.join(REPO, "tools", "reproduce.py"),
                          "batch-study", "--dry-run", "--iterations", "601"],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "multiple" in bad.stderr


def test_finished_runs_are_skipped_and_interrupted_resumed(tmp_path):
    cells = reproduce.batch_cells(seeds=[1])
    for cell, state in ((cells[0], "finished"), (cells[1], "running")):
        os.makedirs(tmp_path / cell.name)
        (tmp_path / cell.name / "run_status.json").write_text(json.dumps({"state": state}))
    out = dry_run("--output-root", str(tmp_path), "--seeds", "1")
    assert f"[done]     {cells[0].name}" in out
    resumed = [l for l in out.splitlines() if cells[1].name in l and "train_net.py" in l]
    assert len(resumed) == 1 and "--resume" in resumed[0]


def _fake_run(directory, norm, seed, curve, state="finished"):
    os.makedirs(directory)
    (directory / "run_status.json").write_text(json.dumps({"state": state}))
    last = max(curve)
    (directory / "config.yaml").write_text(
        f"MODEL:\n  RESNETS:\n    NORM: {norm}\nSEED: {seed}\nSOLVER:\n  MAX_ITER: {last}\n")
    # as detectron2 logs them: periodic evaluations at the index of the iteration they follow,
    # the final one at MAX_ITER; a NaN AP (no detection) is left out of the curve
    (directory / "metrics.json").write_text(
        json.dumps({"iteration": 10, "bbox/AP": float("nan")}) + "\n" + "".join(
            json.dumps({"iteration": it if it == last else it - 1, "bbox/AP": ap}) + "\n"
            for it, ap in curve.items()))
    if state == "finished":
        (directory / "results.json").write_text(json.dumps({"evaluations": {"val": {
            "iteration": last, "metrics": {"bbox": {"AP": curve[last], "AP50": 2 * curve[last],
                                                    "AP75": None}}}}}))


def test_report_table_and_curves(tmp_path):
    dirs = []
    for norm, seed, aps in (("BN_IMG8", 1, (5.0, 10.0)), ("BN_IMG8", 2, (6.0, 12.0)),
                            ("BN_IMG1", 1, (2.0, 4.0)), ("GN", 1, (7.0, 14.0)),
                            ("GN", 2, (7.0, 16.0))):
        d = tmp_path / f"{norm}_{seed}"
        _fake_run(d, norm, seed, {100: aps[0], 200: aps[1]})
        dirs.append(str(d))
    d = tmp_path / "nf"
    _fake_run(d, "NF", 1, {100: 1.0}, state="failed")
    dirs.append(str(d))
    png = tmp_path / "curves.png"
    table = tmp_path / "t.md"
    code = study_curves.main([*dirs, "-o", str(png), "--table", str(table),
                              "--csv", str(tmp_path / "t.csv")])
    assert code == 0 and png.stat().st_size > 1000
    text = table.read_text()
    bn = next(l for l in text.splitlines() if l.startswith("| BN |"))
    gn = next(l for l in text.splitlines() if l.startswith("| GN |"))
    assert "| AP@8 | AP@1 | AP (no batch stats) |" in text
    assert bn.split(" | ")[1:3] == ["11.0 ± 1.4 (2)", "4.0"]
    assert gn.split(" | ")[3] == "15.0 ± 1.4 (2)"
    assert "| NF | | | failed |" in text or "failed" in next(
        l for l in text.splitlines() if l.startswith("| NF |"))
    curves = study_curves.curves([study_curves.read_run(x) for x in dirs])
    assert curves["BN_IMG8"] == {100: [5.0, 6.0], 200: [10.0, 12.0]}
    assert len((tmp_path / "t.csv").read_text().splitlines()) == 7


def test_effect_sizes_beside_the_paper_and_the_plateau_check(tmp_path):
    runs = []
    for norm, seed, aps in (("BN_IMG8", 1, (5.0, 10.0)), ("BN_IMG8", 2, (6.0, 12.0)),
                            ("BN_IMG1", 1, (2.0, 4.0)), ("BN_IMG1", 2, (3.0, 6.0)),
                            ("GN", 1, (7.0, 14.0)), ("GN", 2, (7.0, 16.0)),
                            ("NF", 1, (0.0, 0.2))):
        d = tmp_path / f"{norm}_{seed}"
        _fake_run(d, norm, seed, {100: aps[0], 200: aps[1]})
        runs.append(study_curves.read_run(str(d)))
    lines = study_curves.effect_sizes(runs).splitlines()
    drop = next(l for l in lines if l.startswith("| BN@k − BN@8, measured |"))
    # (4 + 6) / 2 - (10 + 12) / 2 = -6; standard error sqrt(2/2 + 2/2)
    assert drop.split(" | ")[1:] == ["ref.", "-6.0 ± 1.4 |"]
    paper = next(l for l in lines if l.startswith("| BN@k − BN@8, FRN Table 6 |"))
    assert paper.split(" | ")[1:] == ["0.0", "— |"]  # the paper has no 1-image column
    ratio = next(l for l in lines if l.startswith("| BN@k / GN, measured |"))
    assert ratio.split(" | ")[1:] == [f"{11 / 15:.2f}", f"{5 / 15:.2f} |"]
    paper_ratio = next(l for l in lines if l.startswith("| BN@k / GN@k, FRN Table 6 |"))
    assert paper_ratio.split(" | ")[1] == f"{38.7 / 39.3:.2f}"
    assert not any(l.startswith("| BN@k / NF") for l in lines)  # NF detects nothing
    assert lines[-1] == "No ratio to NF (0.2): mean box AP below 1."
    plateau = study_curves.plateau(runs, last=2).splitlines()
    assert "| it 100 | it 200 | last change |" in plateau[2]
    gn = next(l for l in plateau if l.startswith("| GN |"))
    assert gn == "| GN | 7.0 | 15.0 | +8.0 |"
    assert [l.split(" | ")[0] for l in plateau[4:]] == ["| BN_IMG8", "| BN_IMG1", "| GN", "| NF"]


STUDY_DOC = os.path.join(REPO, "docs", "study_batch.md")
STUDY_RECORDS = os.path.join(REPO, "docs", "study_batch")
REPORT_BEGIN = "<!-- BEGIN study_curves report"
REPORT_END = "<!-- END study_curves report -->"


def _records(kind):
    root = os.path.join(STUDY_RECORDS, kind)
    return [os.path.join(root, name) for name in sorted(os.listdir(root))]


def test_the_published_tables_are_the_report_of_the_published_records():
    """docs/study_batch.md's tables are what tools/study_curves.py computes from the per-run
    records beside it (docs/study_batch/runs), and the study's 16 runs all finished."""
    with open(STUDY_DOC) as f:
        text = f.read()
    start = text.index("\n", text.index(REPORT_BEGIN)) + 1
    block = text[start:text.index(REPORT_END)]
    runs = [study_curves.read_run(d) for d in _records("runs")]
    assert block.strip() == study_curves.report(runs).strip()
    assert len(runs) == 16 and {r["state"] for r in runs} == {"finished"}
    cells = {(r["norm"], r["seed"]) for r in runs}
    assert cells == {(n, s) for n in ("BN_IMG8", "BN_IMG4", "BN_IMG2", "BN_IMG1", "GN", "GNWS",
                                      "FRN_LEPS", "NF") for s in (1, 2)}
    with open(os.path.join(STUDY_RECORDS, "study_cells.json")) as f:
        outcomes = json.load(f)
    assert {os.path.basename(d) for d in _records("runs")} == set(outcomes)
    assert {c["outcome"] for c in outcomes.values()} == {"finished"}


def test_the_cell_re_run_from_the_documented_command_gives_the_same_ap():
    (rerun,) = _records("rerun")
    original = os.path.join(STUDY_RECORDS, "runs", os.path.basename(rerun))
    again, first = study_curves.read_run(rerun), study_curves.read_run(original)
    assert again["state"] == first["state"] == "finished"
    assert again["final"] == first["final"] and again["curve"] == first["curve"]
