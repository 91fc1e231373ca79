"""ap_table / plot_ap on directories of real (tiny) training runs of tools/train_net.py.

One session fixture trains three runs on the tiny synthetic set (64 px, 10 iterations):
Mask R-CNN R18-FPN with GN at 2 and 1 images per GPU, and with FRN at 2 images per GPU.
"""
import csv
import io
import json
import math
import os
import shutil
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN_NET = os.path.join(REPO, "tools", "train_net.py")
AP_TABLE = os.path.join(REPO, "tools", "ap_table.py")
PLOT_AP = os.path.join(REPO, "tools", "plot_ap.py")
CONFIG = os.path.join(REPO, "configs", "synthetic", "mask_rcnn_R18_FPN_GN.yaml")
VAL = "synthetic_shapes_tiny_val"
TINY = [
    "DATALOADER.NUM_WORKERS", "0",
    "DATASETS.TRAIN", "('synthetic_shapes_tiny_train',)", "DATASETS.TEST", f"('{VAL}',)",
    "INPUT.MIN_SIZE_TRAIN", "(64,)", "INPUT.MAX_SIZE_TRAIN", "64",
    "INPUT.MIN_SIZE_TEST", "64", "INPUT.MAX_SIZE_TEST", "64",
    "SOLVER.MAX_ITER", "10", "SOLVER.WARMUP_ITERS", "2", "SOLVER.STEPS", "()",
    "SOLVER.BASE_LR", "0.01", "SOLVER.CHECKPOINT_PERIOD", "1000",
    # an untrained detector scores low: keep its detections so that AP is a number
    "MODEL.ROI_HEADS.SCORE_THRESH_TEST", "0.0", "TEST.DETECTIONS_PER_IMAGE", "30",
]
RUNS = {
    "gn_ipg2": ["SOLVER.IMS_PER_BATCH", "2"],
    "gn_ipg1": ["SOLVER.IMS_PER_BATCH", "1"],
    "frn_ipg2": ["SOLVER.IMS_PER_BATCH", "2", "MODEL.RESNETS.NORM", "FRN", "MODEL.FPN.NORM",
                 "FRN", "MODEL.ROI_BOX_HEAD.NORM", "FRN", "MODEL.ROI_MASK_HEAD.NORM", "FRN"],
}

ENV = dict(os.environ, OMP_NUM_THREADS="2")

pytestmark = pytest.mark.slow


@pytest.fixture(scope="session")
def real_runs(tmp_path_factory, run_command):
    root = tmp_path_factory.mktemp("real_runs")
    for name, opts in RUNS.items():
        run_command([sys.executable, TRAIN_NET, "--config-file", CONFIG, *TINY, *opts,
                     "OUTPUT_DIR", str(root / name)], env=ENV)
    return root


def test_each_run_dir_has_the_files(real_runs):
    import d2_norms  # noqa: F401
    from d2_norms.evaluation import load_results, load_run_status

    for name in RUNS:
        d = real_runs / name
        assert {"config.yaml", "metrics.json", "last_checkpoint", "results.json",
                "run_status.json"} <= set(os.listdir(d))
        assert load_run_status(str(d / "run_status.json"))["state"] == "finished"
        data = load_results(str(d / "results.json"))
        assert data["run"]["detector_label"] == "Mask R-CNN R18-FPN"
        assert data["run"]["images_per_gpu"] == (1 if name == "gn_ipg1" else 2)
        metrics = data["evaluations"][VAL]["metrics"]
        for task in ("bbox", "segm"):
            assert all(isinstance(metrics[task][m], float) for m in ("AP", "AP50", "AP75"))


def test_backends_agree_on_real_predictions(real_runs):
    """The trained models' predictions on the synthetic val, both backends, to 1e-4."""
    import d2_norms  # noqa: F401
    from detectron2.data import MetadataCatalog

    import d2_norms.data  # noqa: F401  (registers the synthetic sets)
    from d2_norms.evaluation import load_results
    from d2_norms.evaluation.backends import COCO_METRICS, evaluate_coco_results, load_coco_gt

    json_file = MetadataCatalog.get(VAL).json_file
    for name in RUNS:
        with open(real_runs / name / "inference" / "coco_instances_results.json") as f:
            predictions = json.load(f)
        assert predictions
        saved = load_results(str(real_runs / name / "results.json"))
        saved = saved["evaluations"][VAL]["metrics"]
        for task in ("bbox", "segm"):
            out = {b: evaluate_coco_results(load_coco_gt(json_file, b), predictions, task, b)
                   for b in ("faster_coco_eval", "pycocotools")}
            for m in COCO_METRICS:
                a, b = out["faster_coco_eval"].metrics[m], out["pycocotools"].metrics[m]
                assert (math.isnan(a) and math.isnan(b)) or abs(a - b) <= 1e-4, (name, task, m)
                if saved[task][m] is not None:  # what training saved (faster-coco-eval)
                    assert abs(saved[task][m] - b) <= 1e-4, (name, task, m)


def test_ap_table_on_real_runs(real_runs, tmp_path, capsys, run_command, load_tool):
    import d2_norms  # noqa: F401
    from d2_norms.evaluation import load_results, write_run_status

    ap = {n: load_results(str(real_runs / n / "results.json"))["evaluations"][VAL]["metrics"]
          for n in RUNS}
    # A fourth directory: a copy of a run that is (again) training, e.g. resumed.
    resumed = tmp_path / "frn_ipg1_resumed"
    shutil.copytree(real_runs / "frn_ipg2", resumed)
    os.remove(resumed / "results.json")
    cfg_text = (resumed / "config.yaml").read_text().replace("IMS_PER_BATCH: 2", "IMS_PER_BATCH: 1")
    (resumed / "config.yaml").write_text(cfg_text)
    write_run_status(str(resumed), "running", iteration=4, max_iter=10)

    out = run_command([sys.executable, AP_TABLE, os.path.join(str(real_runs), "*"),
                       str(resumed), "--paper"], env=ENV)
    md = out.stdout
    assert f"### Mask R-CNN R18-FPN — {VAL}" in md
    assert "| normalizer | box AP@2 | box AP@1 | box AP50@2 |" in md
    gn_line = next(line for line in md.splitlines() if line.startswith("| GN |"))
    cells = [c.strip() for c in gn_line.strip("|").split("|")]
    assert cells[1] == f"{ap['gn_ipg2']['bbox']['AP']:.1f}"
    assert cells[2] == f"{ap['gn_ipg1']['bbox']['AP']:.1f}"
    frn_line = next(line for line in md.splitlines() if line.startswith("| FRN |"))
    frn_cells = [c.strip() for c in frn_line.strip("|").split("|")]
    assert frn_cells[1] == f"{ap['frn_ipg2']['bbox']['AP']:.1f}" and frn_cells[2] == "running"
    assert "GN [paper: GN Table 7, R50-FPN]" in md  # published rows next to the runs

    ap_table = load_tool("ap_table")  # in-process from here on (the CLI ran above)
    assert ap_table.main([str(real_runs), "--csv"]) == 0
    csv_out = capsys.readouterr().out
    rows = list(csv.DictReader(io.StringIO(csv_out)))
    mask_gn1 = next(r for r in rows if r["row"] == "GN" and r["task"] == "segm"
                    and r["metric"] == "AP75" and r["images_per_gpu"] == "1")
    assert float(mask_gn1["mean"]) == pytest.approx(ap["gn_ipg1"]["segm"]["AP75"], abs=1e-6)
    assert mask_gn1["runs"] == str(real_runs / "gn_ipg1")

    # a damaged results.json: named with the reason, the other runs still tabulated, exit 1
    broken = tmp_path / "broken"
    shutil.copytree(real_runs / "gn_ipg1", broken)
    (broken / "results.json").write_text((broken / "results.json").read_text()[:100])
    assert ap_table.main([str(real_runs / "gn_ipg2"), str(broken)]) == 1
    bad = capsys.readouterr()
    assert f"{broken}/results.json: results.json is not valid JSON" in bad.err
    assert "| GN |" in bad.out


def test_plot_on_real_runs(real_runs, tmp_path, run_command):
    png = tmp_path / "ap.png"
    out = run_command([sys.executable, PLOT_AP, str(real_runs), "-o", str(png), "--task", "segm",
                       "--print-data"], env=ENV)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    data = json.loads(out.stdout)
    (panel,) = data["panels"]
    series = {s["label"]: s for s in panel["series"]}
    assert set(series) == {"GN", "FRN"}
    assert series["GN"]["x"] == [2.0, 1.0] and series["FRN"]["x"] == [2.0]
    with open(real_runs / "gn_ipg1" / "results.json") as f:
        gn1 = json.load(f)["evaluations"][VAL]["metrics"]["segm"]["AP"]
    assert series["GN"]["y"][1] == pytest.approx(gn1)
