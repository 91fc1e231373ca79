"""AP tables and plots across run directories (written with the trainer's own file functions);
tests/test_eval_real_runs.py does the same on directories of real training runs."""
import csv
import io
import json
import os
import statistics
from pathlib import Path

import pytest

import d2_norms  # noqa: F401
from detectron2.config import get_cfg

from d2_norms.evaluation.plot import FAILED_LABEL
from d2_norms.evaluation import (
    DuplicateRunsError,
    build_tables,
    collect_runs,
    format_csv,
    format_markdown,
    parse_columns,
    plot_ap_vs_images_per_gpu,
    save_results,
    tables_to_json,
    write_run_status,
)
from d2_norms.evaluation.paper_results import FRN_TABLE_6, GN_TABLE_7

DATASET = "synthetic_shapes_val"


def _metrics(ap):
    return {"AP": ap, "AP50": ap + 20.0, "AP75": ap - 2.0, "APs": ap - 10, "APm": ap, "APl": ap + 5}


def make_run(root, name, *, arch="RetinaNet", norm="FRN", ims=16, ref=8, state="finished",
             ap=None, mask_ap=None, iteration=99, logged=None, base_lr=None):
    """A run directory as tools/train_net.py leaves it: config.yaml (detectron2's dump),
    run_status.json, metrics.json and, when evaluated, results.json."""
    cfg = get_cfg()
    if arch == "RetinaNet":
        cfg.MODEL.META_ARCHITECTURE = "RetinaNet"
        cfg.MODEL.BACKBONE.NAME = "build_retinanet_resnet_fpn_backbone"
        cfg.MODEL.RETINANET.NORM = norm
    else:
        cfg.MODEL.MASK_ON = True
        cfg.MODEL.BACKBONE.NAME = "build_resnet_fpn_backbone"
        cfg.MODEL.ROI_BOX_HEAD.NORM = norm
        cfg.MODEL.ROI_MASK_HEAD.NORM = norm
    cfg.MODEL.RESNETS.NORM = norm
    cfg.MODEL.FPN.NORM = norm
    cfg.MODEL.RESNETS.DEPTH = 18
    cfg.SOLVER.IMS_PER_BATCH = ims
    cfg.SOLVER.REFERENCE_WORLD_SIZE = ref
    cfg.SOLVER.MAX_ITER = 100
    if base_lr is not None:
        cfg.SOLVER.BASE_LR = base_lr
    cfg.DATASETS.TEST = (DATASET,)
    out = os.path.join(str(root), name)
    cfg.OUTPUT_DIR = out
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "config.yaml"), "w") as f:
        f.write(cfg.dump())
    write_run_status(out, "running", start_iter=0, max_iter=100)
    if logged is not None:
        with open(os.path.join(out, "metrics.json"), "w") as f:
            for it in range(19, logged + 1, 20):
                f.write(json.dumps({"iteration": it, "total_loss": 1.0}) + "\n")
    if state == "failed":
        write_run_status(out, "failed", iteration=7,
                         error="FloatingPointError: Loss became infinite")
    if ap is not None:
        results = {"bbox": _metrics(ap)}
        if mask_ap is not None:
            results["segm"] = _metrics(mask_ap)
        save_results(out, results, cfg, iteration, DATASET)
    if state == "finished":
        write_run_status(out, "finished", iteration=100)
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    paths = {
        # RetinaNet, REFERENCE_WORLD_SIZE 8: IMS_PER_BATCH 64 / 32 / 16 = 8 / 4 / 2 images per GPU
        "frn8": make_run(root, "frn_ipg8", norm="FRN", ims=64, ap=20.0),
        "frn4": make_run(root, "frn_ipg4", norm="FRN", ims=32, ap=19.5),
        "frn2": make_run(root, "frn_ipg2", norm="FRN", ims=16, ap=19.0),
        "gn4": make_run(root, "gn_ipg4", norm="GN", ims=32, ap=18.0),
        "gn2": make_run(root, "gn_ipg2", norm="GN", ims=16, state="running", logged=59),
        "bn2a": make_run(root, "bn_ipg2_seed1", norm="BN", ims=16, ap=10.0),
        "bn2b": make_run(root, "bn_ipg2_seed2", norm="BN", ims=16, ap=12.5),
        "bn2c": make_run(root, "bn_ipg2_seed3", norm="BN", ims=16, ap=11.0),
        "frn1": make_run(root, "frn_ipg1", norm="FRN", ims=8, state="failed"),
        # Mask R-CNN, REFERENCE_WORLD_SIZE 0 in a 1-process run: 2 images per GPU
        "mask_gn": make_run(root, "mask_gn_ipg2", arch="MaskRCNN", norm="GN", ims=2, ref=0,
                            ap=15.0, mask_ap=13.0),
    }
    return root, paths


def _cells_by_column(table, row_label):
    row = next(r for r in table.rows if r.label == row_label)
    return {table.column_label(*c): row.cells[c].text() if c in row.cells else "–"
            for c in table.columns()}


def test_tables_group_and_lay_out_like_the_papers(runs):
    root, paths = runs
    records, problems = collect_runs([str(root)])  # a folder of runs stands for its runs
    assert problems == [] and len(records) == len(paths)
    tables = build_tables(records)
    assert [(t.detector, t.dataset) for t in tables] == [
        ("Mask R-CNN R18-FPN", DATASET), ("RetinaNet R18-FPN", DATASET)]
    mask, retina = tables
    assert retina.images_per_gpu == [8, 4, 2, 1]
    assert [r.label for r in retina.rows] == ["BN", "GN", "FRN"]  # papers' row order
    assert [retina.column_label(*c) for c in retina.columns()][:5] == [
        "AP@8", "AP@4", "AP@2", "AP@1", "AP50@8"]
    frn = _cells_by_column(retina, "FRN")
    assert (frn["AP@8"], frn["AP@4"], frn["AP@2"], frn["AP50@8"], frn["AP75@2"]) == (
        "20.0", "19.5", "19.0", "40.0", "17.0")
    assert frn["AP@1"] == "failed"
    gn = _cells_by_column(retina, "GN")
    assert gn["AP@2"] == "running" and gn["AP@8"] == "–" and gn["AP@4"] == "18.0"
    bn = _cells_by_column(retina, "BN")
    values = [10.0, 12.5, 11.0]
    assert bn["AP@2"] == (f"{statistics.mean(values):.1f} ± {statistics.stdev(values):.1f} (n=3)")
    # notes name the duplicates and the unfinished runs with their state
    notes = "\n".join(retina.notes)
    assert paths["bn2a"] in notes and paths["bn2c"] in notes and "duplicates" in notes
    assert "running, iteration 59 of 100" in notes
    assert "FloatingPointError: Loss became infinite" in notes
    # Mask R-CNN: box and mask AP (GN Table 7 layout)
    assert mask.tasks == ("bbox", "segm") and mask.images_per_gpu == [2]
    assert _cells_by_column(mask, "GN") == {
        "box AP@2": "15.0", "box AP50@2": "35.0", "box AP75@2": "13.0",
        "mask AP@2": "13.0", "mask AP50@2": "33.0", "mask AP75@2": "11.0"}


def test_markdown_csv_json(runs):
    root, paths = runs
    records, problems = collect_runs([os.path.join(str(root), "*")])
    tables = build_tables(records)
    md = format_markdown(tables)
    assert "| normalizer | AP@8 | AP@4 | AP@2 | AP@1 |" in md
    assert "| FRN | 20.0 | 19.5 | 19.0 | failed |" in md
    assert "| normalizer | box AP@2 | box AP50@2 | box AP75@2 | mask AP@2 |" in md

    rows = list(csv.DictReader(io.StringIO(format_csv(tables))))
    bn = [r for r in rows
          if r["row"] == "BN" and r["metric"] == "AP" and r["images_per_gpu"] == "2"]
    assert len(bn) == 1
    assert float(bn[0]["mean"]) == pytest.approx(statistics.mean([10.0, 12.5, 11.0]))
    assert float(bn[0]["std"]) == pytest.approx(statistics.stdev([10.0, 12.5, 11.0]), abs=1e-6)
    assert bn[0]["n"] == "3" and bn[0]["values"] == "10.0;12.5;11.0"
    gn2 = [r for r in rows if r["row"] == "GN" and r["images_per_gpu"] == "2"
           and r["detector"].startswith("RetinaNet")]
    assert gn2 and all(r["status"] == "running" and r["runs"] == paths["gn2"] for r in gn2)

    data = json.loads(json.dumps(tables_to_json(tables, records, problems)))
    assert {r["status"] for r in data["runs"]} == {"finished", "running", "failed"}
    retina = next(t for t in data["tables"] if t["arch"] == "RetinaNet")
    frn = next(r for r in retina["rows"] if r["label"] == "FRN")
    cell = next(c for c in frn["cells"]
                if c["metric"] == "AP" and c["images_per_gpu"] == 8)
    assert cell["mean"] == 20.0 and cell["runs"] == [paths["frn8"]]


def test_duplicates_can_be_an_error(runs):
    root, paths = runs
    records, _ = collect_runs([str(root)])
    with pytest.raises(DuplicateRunsError) as info:
        build_tables(records, duplicates="error")
    assert "BN @2: 3 finished runs" in str(info.value) and paths["bn2b"] in str(info.value)


def test_runs_differing_in_head_norms_get_own_rows(tmp_path):
    a = make_run(tmp_path, "gn_all", norm="GN", ims=16, ap=20.0)
    b = make_run(tmp_path, "gn_backbone_only", norm="GN", ims=16, ap=15.0)
    # same backbone normalizer, but the FPN and head without normalization
    with open(os.path.join(b, "results.json")) as f:
        data = json.load(f)
    data["run"]["norms"].update(fpn="none", head="none")
    with open(os.path.join(b, "results.json"), "w") as f:
        json.dump(data, f)
    records, _ = collect_runs([a, b])
    (table,) = build_tables(records, duplicates="error")  # not duplicates of one cell
    assert sorted(r.label for r in table.rows) == ["GN (fpn: GN, head: GN)",
                                                  "GN (fpn: none, head: none)"]


def test_paper_rows(runs):
    root, _ = runs
    records, _ = collect_runs([os.path.join(str(root), "frn_*")])
    tables = build_tables(records, include_paper=True)
    retina = next(t for t in tables if t.arch == "RetinaNet")
    paper = {r.label: r for r in retina.rows if r.source == "FRN Table 6"}
    assert set(paper) == {f"{n} [paper: FRN Table 6, R101-FPN]" for n in ("BN*", "BN", "GN", "FRN")}
    frn = _cells_by_column(retina, "FRN [paper: FRN Table 6, R101-FPN]")
    assert (frn["AP@8"], frn["AP@4"], frn["AP@2"], frn["AP50@2"], frn["AP75@4"]) == (
        "39.6", "39.5", "39.1", "57.5", "43.3")
    assert any("Singh & Krishnan" in n for n in retina.notes)
    # No Mask R-CNN run among these: GN Table 7 stands as its own table, box and mask at 2/GPU
    gn = next(t for t in tables if t.arch == "Mask R-CNN")
    assert gn.detector == "Mask R-CNN (published)" and gn.images_per_gpu == [2]
    r50 = _cells_by_column(gn, "GN [paper: GN Table 7, R50-FPN]")
    assert (r50["box AP@2"], r50["mask AP@2"], r50["mask AP75@2"]) == ("39.5", "35.2", "37.6")


def test_paper_transcription_matches_the_papers_text():
    """The differences FRN sec. 4.3 and GN sec. 4.2 quote, recomputed from the stored rows."""
    rows = {r.normalizer: r.values for r in FRN_TABLE_6.rows}
    ap = {n: {g: v[g]["bbox"]["AP"] for g in v} for n, v in rows.items()}
    assert round(ap["FRN"][8] - ap["BN"][8], 1) == 0.9
    assert round(ap["FRN"][2] - ap["BN"][2], 1) == 8.9
    assert round(ap["BN"][8] - ap["BN"][2], 1) == 8.5
    assert round(ap["BN*"][2] - ap["BN"][2], 1) == 2.7
    assert ap["BN*"][8] == 38.3
    r101 = next(r for r in GN_TABLE_7.rows if r.backbone == "R101-FPN").values[2]
    assert (r101["bbox"]["AP"], r101["segm"]["AP"]) == (41.0, 36.4)


def test_problems_are_reported_not_dropped(tmp_path, runs):
    root, paths = runs
    bad = tmp_path / "bad_results"
    bad.mkdir()
    (bad / "config.yaml").write_text(Path(paths["frn8"], "config.yaml").read_text())
    (bad / "results.json").write_text('{"schema_version": 1, "run": {')
    empty = tmp_path / "not_a_run"
    empty.mkdir()
    no_results = make_run(tmp_path, "finished_without_results", norm="GN", ims=64)
    records, problems = collect_runs([str(bad), str(empty), str(tmp_path / "missing"),
                                      no_results, paths["frn8"]])
    text = "\n".join(problems)
    assert f"{bad}/results.json: results.json is not valid JSON (line 1" in text
    assert "--eval-only" in text  # how to re-create it
    assert f"{empty}: not a run directory" in text
    assert f"{tmp_path / 'missing'}: no such run directory" in text
    assert [r.path for r in records] == [no_results, paths["frn8"]]
    assert records[0].status == "no results"
    assert "says finished but there is no results.json" in records[0].warnings[0]
    table = build_tables(records)[0]
    assert _cells_by_column(table, "GN")["AP@8"] == "no results"


def test_ap_table_cli(runs, tmp_path, capsys, load_tool):
    root, paths = runs
    ap_table = load_tool("ap_table")
    png = tmp_path / "ap.png"
    code = ap_table.main([os.path.join(str(root), "*"), str(tmp_path / "nowhere"), "--paper",
                          "--plot", str(png)])
    out, err = capsys.readouterr()
    assert code == 1  # one unreadable argument ...
    assert "nowhere: no such run directory" in err
    assert "| FRN | 20.0 | 19.5 | 19.0 | failed |" in out  # ... the others are still tabulated
    assert "FRN [paper: FRN Table 6, R101-FPN]" in out and png.exists()

    assert ap_table.main([str(root), "--duplicates", "error"]) == 2
    assert "several runs per cell" in capsys.readouterr().err

    out_json = tmp_path / "ap.json"
    assert ap_table.main([str(root), "--json", "-o", str(out_json)]) == 0
    data = json.loads(out_json.read_text())
    assert len(data["runs"]) == len(paths) and data["problems"] == []

    assert ap_table.main([str(root), "--csv", "--dataset", DATASET]) == 0
    header = capsys.readouterr().out.splitlines()[0]
    assert header.startswith("dataset,detector,row,normalizer,source,images_per_gpu")


def test_markdown_columns_select_blocks_in_the_given_order(runs, capsys, load_tool):
    """FRN Table 6 layout with the columns a study reports (box AP/AP50/AP75 + mask AP): the
    blocks asked for, in that order, each under every images-per-GPU, only where a table has
    the task; a bad spec is a usage error."""
    root, _ = runs
    records, _ = collect_runs([str(root)])
    tables = build_tables(records)
    cols = parse_columns(["box:AP", "bbox:AP75", "mask:AP"])
    assert cols == [("bbox", "AP"), ("bbox", "AP75"), ("segm", "AP")]
    md = format_markdown(tables, columns=cols)
    assert "| normalizer | box AP@2 | box AP75@2 | mask AP@2 |" in md
    assert "| GN | 15.0 | 13.0 | 13.0 |" in md  # _metrics: AP75 = AP - 2
    assert "| normalizer | AP@8 | AP@4 | AP@2 | AP@1 | AP75@8 | AP75@4 | AP75@2 | AP75@1 |" in md
    assert "AP50" not in md and "mask AP by the COCO" not in md.split("### Mask R-CNN")[0]
    only_mask = format_markdown(tables, columns=parse_columns(["mask:AP"]))
    assert "none of the selected columns applies" in only_mask  # RetinaNet: boxes only
    assert "| normalizer | mask AP@2 |" in only_mask
    with pytest.raises(ValueError, match="'box:AP90'.*TASK:METRIC"):
        parse_columns(["box:AP90"])
    ap_table = load_tool("ap_table")
    assert ap_table.main([str(root), "--columns", "box:AP", "mask:AP"]) == 0
    assert "| normalizer | box AP@2 | mask AP@2 |" in capsys.readouterr().out
    for bad in (["--columns", "keypoints:AP"], ["--columns", "box:AP", "--csv"]):
        with pytest.raises(SystemExit) as info:
            ap_table.main([str(root), *bad])
        assert info.value.code == 2


def test_plot_has_one_series_per_normalizer(runs, tmp_path):
    root, _ = runs
    records, _ = collect_runs([str(root)])
    tables = build_tables(records, include_paper=True)
    png = tmp_path / "plots" / "ap.png"
    data = plot_ap_vs_images_per_gpu(tables, str(png), task="bbox", metric="AP")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    retina = next(p for p in data.panels if p.title.startswith("RetinaNet"))
    series = {s.label: s for s in retina.series}
    # runs: BN (only @2), GN (only @4: the @2 run is still running), FRN (@8, 4, 2; @1 failed)
    assert {k for k, s in series.items() if s.source == "runs"} == {"BN", "GN", "FRN"}
    assert series["FRN"].x == [8.0, 4.0, 2.0] and series["FRN"].y == [20.0, 19.5, 19.0]
    assert series["FRN"].failed_x == [1.0]  # a failed cell is drawn as failed, not dropped ...
    assert series["GN"].x == [4.0] and series["GN"].failed_x == []  # ... a running one is not
    assert series["BN"].y == [pytest.approx(statistics.mean([10.0, 12.5, 11.0]))]
    assert series["BN"].yerr == [pytest.approx(statistics.stdev([10.0, 12.5, 11.0]))]
    assert series["FRN [paper: FRN Table 6, R101-FPN]"].y == [39.6, 39.5, 39.1]
    # the matplotlib figure shows the same: legend entries, log2 x axis, large batches left
    ax = next(a for a in data.figure.axes if a.get_title().startswith("RetinaNet"))
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert legend == [s.label for s in retina.series] + [FAILED_LABEL]
    # the failed FRN cell: an x in FRN's colour at x=1 on the panel's floor, not a 0-AP point
    frn_colour = next(c for c in ax.containers if c.get_label() == "FRN").lines[0].get_color()
    marks = [ln for ln in ax.lines if ln.get_marker() == "x" and len(ln.get_xdata())]
    assert len(marks) == 1 and list(marks[0].get_xdata()) == [1.0]
    assert marks[0].get_color() == frn_colour
    assert list(marks[0].get_ydata()) == [ax.get_ylim()[0]]
    assert ax.get_xlim()[0] > 8 and ax.get_xlim()[1] < 1  # the x axis includes the failed cell
    assert ax.get_xscale() == "log" and ax.get_xlim()[0] > ax.get_xlim()[1]
    assert ax.get_xlabel() == "images per GPU" and ax.get_ylabel() == "box AP (COCO metric)"
    styles = {c.get_label(): c.lines[0].get_linestyle() for c in ax.containers}
    assert set(styles) == set(series)
    assert all((style == "--") == ("[paper:" in label) for label, style in styles.items())
    # masks: only the Mask R-CNN panels
    seg = plot_ap_vs_images_per_gpu(tables, str(tmp_path / "mask.png"), task="segm")
    assert [p.title.split(" — ")[0] for p in seg.panels] == ["Mask R-CNN R18-FPN"]
    assert {s.label for s in seg.panels[0].series} == {"GN", "GN [paper: GN Table 7, R50-FPN]",
                                                       "GN [paper: GN Table 7, R101-FPN]"}


def test_plot_errors_and_cli(runs, tmp_path, capsys, load_tool):
    root, _ = runs
    records, _ = collect_runs([os.path.join(str(root), "frn_*")])
    with pytest.raises(ValueError, match="no finished run has segm AP"):
        plot_ap_vs_images_per_gpu(build_tables(records), str(tmp_path / "x.png"), task="segm")
    plot_ap = load_tool("plot_ap")
    png = tmp_path / "cli.png"
    assert plot_ap.main([str(root), "-o", str(png), "--metric", "AP50", "--print-data"]) == 0
    data = json.loads(capsys.readouterr().out)
    retina = next(p for p in data["panels"] if p["title"].startswith("RetinaNet"))
    frn = next(s for s in retina["series"] if s["label"] == "FRN")
    assert frn["y"] == [40.0, 39.5, 39.0] and png.exists()


def test_lr_sweep_cell_reports_the_best_lr_labelled(tmp_path):
    """Issue 13 item 5: FRN sec. 4.3 reports the best of base lr {0.01, 0.05, 0.1}. Runs of one
    cell at different lrs per image are a sweep: the cell keeps the best lr's runs (mean over
    repeats), says so, and a note lists every lr; runs at one lr keep averaging."""
    # total batch 32 (4 images/GPU on 8): lr = base_lr * 32 / 64
    make_run(tmp_path, "lr001", norm="FRN", ims=32, base_lr=0.005, ap=18.0)
    make_run(tmp_path, "lr005a", norm="FRN", ims=32, base_lr=0.025, ap=21.0)
    make_run(tmp_path, "lr005b", norm="FRN", ims=32, base_lr=0.025, ap=23.0)
    make_run(tmp_path, "lr01", norm="FRN", ims=32, base_lr=0.05, ap=21.5)
    make_run(tmp_path, "gn", norm="GN", ims=32, base_lr=0.025, ap=17.0)
    records, problems = collect_runs([str(tmp_path)])
    assert not problems
    (table,) = build_tables(records)
    frn = next(r for r in table.rows if r.label == "FRN")
    ap = frn.cells[("bbox", "AP", 4)]
    assert ap.values == [21.0, 23.0] and ap.mean == pytest.approx(22.0)
    assert sorted(os.path.basename(r) for r in ap.runs) == ["lr005a", "lr005b"]
    assert ap.text() == "22.0 ± 1.4 (n=2) (best of 3 lr)"
    assert ap.status == "finished, best of lr sweep"
    # every metric of the cell comes from the same (best) runs, not each metric's own best
    assert frn.cells[("bbox", "AP50", 4)].values == [41.0, 43.0]
    note = next(n for n in table.notes if "best of lr sweep" in n)
    assert "base lr 0.05 " in note and "base lr 0.01: 18.0" in note and "base lr 0.1: 21.5" in note
    # a single-lr cell is untouched
    gn = next(r for r in table.rows if r.label == "GN").cells[("bbox", "AP", 4)]
    assert gn.text() == "17.0" and not gn.sweep
    # duplicates="error" only sees repeats of the chosen lr
    with pytest.raises(DuplicateRunsError):
        build_tables(records, duplicates="error")
    text = format_markdown(build_tables(records))
    assert "(best of 3 lr)" in text and "best of lr sweep = base lr 0.05" in text
    rows = list(csv.DictReader(io.StringIO(format_csv(build_tables(records)))))
    assert {r["status"] for r in rows if r["row"] == "FRN"} == {"finished, best of lr sweep"}
