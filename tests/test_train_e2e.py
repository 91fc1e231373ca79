"""End to end through tools/train_net.py on the synthetic set: train, evaluate (bbox + segm),
the files detectron2 writes, --eval-only, --resume, and two gloo processes."""
import glob
import json
import os
import sys

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN_NET = os.path.join(REPO, "tools", "train_net.py")
CONFIG = os.path.join(REPO, "configs", "synthetic", "mask_rcnn_R18_FPN_GN.yaml")
# Tiny but real: the tiny synthetic split (64 px), few iterations, few detections per image.
TRAIN_SET, VAL_SET = "synthetic_shapes_tiny_train", "synthetic_shapes_tiny_val"
TINY = ["DATASETS.TRAIN", f"('{TRAIN_SET}',)", "DATASETS.TEST", f"('{VAL_SET}',)",
        "DATALOADER.NUM_WORKERS", "0", "SOLVER.IMS_PER_BATCH", "2", "SOLVER.BASE_LR", "0.01",
        "SOLVER.WARMUP_ITERS", "2", "SOLVER.STEPS", "()", "INPUT.MIN_SIZE_TRAIN", "(64,)",
        "INPUT.MAX_SIZE_TRAIN", "64", "INPUT.MIN_SIZE_TEST", "64", "INPUT.MAX_SIZE_TEST", "64",
        "TEST.DETECTIONS_PER_IMAGE", "20", "MODEL.RPN.POST_NMS_TOPK_TEST", "100"]
ENV = dict(os.environ, OMP_NUM_THREADS="2")

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def train_net(run_command):
    """``train_net(*args)``: tools/train_net.py with ``args`` in a subprocess; it must succeed."""
    return lambda *args: run_command([sys.executable, TRAIN_NET, *args], env=ENV)


def metrics(output_dir):
    with open(os.path.join(output_dir, "metrics.json")) as f:
        return [json.loads(line) for line in f if line.strip()]


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, train_net):
    out_dir = str(tmp_path_factory.mktemp("run"))
    train_net("--config-file", CONFIG, *TINY, "SOLVER.MAX_ITER", "12",
              "SOLVER.CHECKPOINT_PERIOD", "5", "OUTPUT_DIR", out_dir)
    return out_dir


def test_training_writes_what_detectron2_writes(trained_run):
    files = set(os.listdir(trained_run))
    assert {"config.yaml", "metrics.json", "model_final.pth", "last_checkpoint", "log.txt",
            "model_0000004.pth", "model_0000009.pth"} <= files
    assert glob.glob(os.path.join(trained_run, "events.out.tfevents.*"))
    records = metrics(trained_run)
    losses = [r for r in records if "total_loss" in r]
    assert losses and all(torch.isfinite(torch.tensor(r["total_loss"])) for r in losses)
    assert max(r["iteration"] for r in losses) == 11
    for key in ("loss_cls", "loss_box_reg", "loss_mask", "loss_rpn_cls", "lr"):
        assert key in losses[-1]


def test_training_evaluates_bbox_and_segm_with_cocoeval(trained_run):
    with open(os.path.join(trained_run, "results.json")) as f:
        results = json.load(f)
    metrics_ = results["evaluations"][VAL_SET]["metrics"]
    for task in ("bbox", "segm"):
        assert set(metrics_[task]) >= {"AP", "AP50", "AP75", "APs", "APm", "APl"}
    with open(os.path.join(trained_run, "run_status.json")) as f:
        assert json.load(f)["state"] == "finished"
    predictions = torch.load(os.path.join(trained_run, "inference", "instances_predictions.pth"),
                             weights_only=False)
    from detectron2.data import DatasetCatalog

    import d2_norms  # noqa: F401

    assert len(predictions) == len(DatasetCatalog.get(VAL_SET))


def test_eval_only_reproduces_final_ap(trained_run, tmp_path, train_net):
    train_net("--config-file", CONFIG, *TINY, "--eval-only",
              "MODEL.WEIGHTS", os.path.join(trained_run, "model_final.pth"),
              "OUTPUT_DIR", str(tmp_path))
    def evaluation(d):
        with open(os.path.join(d, "results.json")) as f:
            return json.load(f)["evaluations"][VAL_SET]["metrics"]

    def iteration(d):
        with open(os.path.join(d, "results.json")) as f:
            return json.load(f)["evaluations"][VAL_SET]["iteration"]

    def predictions(d):
        with open(os.path.join(d, "inference", "coco_instances_results.json")) as f:
            return json.load(f)

    # deterministic inference: the same detections and numbers as the training run's final eval
    assert predictions(trained_run) == predictions(str(tmp_path))
    assert evaluation(trained_run) == evaluation(str(tmp_path))
    assert iteration(trained_run) == iteration(str(tmp_path)) == 12  # the weights' iteration


def test_resume_continues_from_last_checkpoint(trained_run, tmp_path, train_net):
    import shutil

    run = tmp_path / "resumed"
    shutil.copytree(trained_run, run)
    # As if killed after the checkpoint of iteration 9: drop what came later.
    os.remove(run / "model_final.pth")
    (run / "last_checkpoint").write_text("model_0000009.pth")
    out = train_net("--config-file", CONFIG, *TINY, "--resume", "SOLVER.MAX_ITER", "14",
                    "SOLVER.CHECKPOINT_PERIOD", "5", "TEST.EVAL_PERIOD", "0",
                    "OUTPUT_DIR", str(run))
    assert "Loading checkpoint from" in out.stdout + out.stderr
    iters = [r["iteration"] for r in metrics(str(run)) if "total_loss" in r]
    assert 13 in iters
    ckpt = torch.load(run / "model_final.pth", weights_only=False)
    assert ckpt["iteration"] == 13


def test_two_gloo_processes_train_and_gather_evaluation(tmp_path, train_net):
    out = train_net("--num-gpus", "2", "--config-file", CONFIG, *TINY,
                    "SOLVER.IMS_PER_BATCH", "4", "SOLVER.MAX_ITER", "4",
                    "OUTPUT_DIR", str(tmp_path))
    log = out.stdout + out.stderr
    assert "World size: 2" in open(tmp_path / "log.txt").read() or "World size: 2" in log
    assert "replicas hold identical weights" in log + open(tmp_path / "log.txt").read()
    predictions = torch.load(tmp_path / "inference" / "instances_predictions.pth",
                             weights_only=False)
    from detectron2.data import DatasetCatalog

    import d2_norms  # noqa: F401

    ids = {p["image_id"] for p in predictions}
    assert ids == {d["image_id"] for d in DatasetCatalog.get(VAL_SET)}
