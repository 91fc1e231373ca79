"""For real, through tools/train_net.py on the tiny synthetic set: a run SIGKILLed after a
checkpoint and resumed with --resume ends with bitwise the same weights and optimizer state as an
uninterrupted run (loader workers or not), and a diverging run stops with its iteration, losses
and remedies without touching the last good checkpoint."""
import hashlib
import json
import os
import re
import sys

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN_NET = os.path.join(REPO, "tools", "train_net.py")
CONFIG = os.path.join(REPO, "configs", "synthetic", "mask_rcnn_R18_FPN_GN.yaml")
TINY = ["DATASETS.TRAIN", "('synthetic_shapes_tiny_train',)",
        "DATASETS.TEST", "('synthetic_shapes_tiny_val',)",
        "SOLVER.IMS_PER_BATCH", "2", "SOLVER.BASE_LR", "0.01", "SOLVER.WARMUP_ITERS", "2",
        "SOLVER.STEPS", "()", "INPUT.MIN_SIZE_TRAIN", "(64,)", "INPUT.MAX_SIZE_TRAIN", "64",
        "INPUT.MIN_SIZE_TEST", "64", "INPUT.MAX_SIZE_TEST", "64",
        "TEST.DETECTIONS_PER_IMAGE", "20", "MODEL.RPN.POST_NMS_TOPK_TEST", "100"]
RUN = ["SOLVER.MAX_ITER", "10", "SOLVER.CHECKPOINT_PERIOD", "3"]
# Same thread count in every run: CPU reductions are deterministic for a fixed thread count.
ENV = dict(os.environ, OMP_NUM_THREADS="1")

pytestmark = pytest.mark.slow


def command(out_dir, workers, *extra, resume=False):
    return ([sys.executable, TRAIN_NET, "--config-file", CONFIG] + (["--resume"] if resume else [])
            + TINY + RUN + ["DATALOADER.NUM_WORKERS", str(workers), *extra,
                            "OUTPUT_DIR", str(out_dir)])


def start_and_kill(out_dir, workers, after_checkpoint, sigkill_at_checkpoint):
    """Start training, SIGKILL it as soon as last_checkpoint names ``after_checkpoint`` or a
    later one; returns the iteration of the checkpoint it will resume from."""
    name = sigkill_at_checkpoint(command(out_dir, workers), out_dir, after_checkpoint, env=ENV,
                                 cwd=REPO)
    return int(re.match(r"model_(\d+)\.pth", name).group(1))


def final_state(out_dir):
    ckpt = torch.load(os.path.join(out_dir, "model_final.pth"), weights_only=True)
    return ckpt["model"], ckpt["trainer"]


def metrics_iterations(out_dir):
    with open(os.path.join(out_dir, "metrics.json")) as f:
        return [json.loads(line)["iteration"] for line in f if '"total_loss"' in line]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, run_command):
    out = tmp_path_factory.mktemp("uninterrupted")
    run_command(command(out, 0), env=ENV)
    return out


@pytest.mark.parametrize("workers,kill_after", [(2, "model_0000002.pth"),
                                                (0, "model_0000005.pth")])
def test_killed_and_resumed_run_ends_bitwise_identical(uninterrupted, tmp_path, workers,
                                                       kill_after, sigkill_at_checkpoint,
                                                       run_command, assert_bitwise_equal):
    resumed = tmp_path / "resumed"
    resume_from = start_and_kill(str(resumed), workers, kill_after, sigkill_at_checkpoint)
    out = run_command(command(resumed, workers, resume=True), env=ENV)
    log = out.stdout + out.stderr
    assert f"Starting training from iteration {resume_from + 1}" in log
    assert max(metrics_iterations(resumed)) == 9

    model_a, trainer_a = final_state(uninterrupted)
    model_b, trainer_b = final_state(resumed)
    assert_bitwise_equal(model_a, model_b, "model")
    # optimizer (momentum buffers, lr of every group), scheduler and iteration as well
    assert_bitwise_equal(trainer_a["_trainer"]["optimizer"], trainer_b["_trainer"]["optimizer"],
                         "optimizer")
    assert trainer_a["hooks"] == trainer_b["hooks"] and trainer_b["iteration"] == 9
    with open(uninterrupted / "results.json") as f, open(resumed / "results.json") as g:
        ra, rb = json.load(f)["evaluations"], json.load(g)["evaluations"]
        assert {k: v["metrics"] for k, v in ra.items()} == {k: v["metrics"] for k, v in rb.items()}
    with open(resumed / "run_status.json") as f:
        assert json.load(f)["state"] == "finished"


def sha(path):
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def test_diverging_run_stops_with_iteration_losses_remedies_and_keeps_good_checkpoints(
        tmp_path, run_command):
    good = ["SOLVER.MAX_ITER", "4", "SOLVER.CHECKPOINT_PERIOD", "2", "TEST.EVAL_PERIOD", "0",
            "DATASETS.TEST", "()"]
    run_command(command(tmp_path, 0, *good), env=ENV)
    before = {n: sha(tmp_path / n) for n in os.listdir(tmp_path) if n.endswith(".pth")}
    assert set(before) == {"model_0000001.pth", "model_0000003.pth", "model_final.pth"}

    # continue with an absurd learning rate, a checkpoint after every step
    bad = ["SOLVER.MAX_ITER", "30", "SOLVER.CHECKPOINT_PERIOD", "1", "SOLVER.BASE_LR", "1e6",
           "SOLVER.WARMUP_ITERS", "0", "DATASETS.TEST", "()"]
    out = run_command(command(tmp_path, 0, *bad, resume=True), env=ENV, expect=1)
    err = out.stderr
    match = re.search(r"non-finite (?:values )?at iteration (\d+) \(of 30\)", err)
    assert match, err[-4000:]
    failed_at = int(match.group(1))
    assert "Losses" in err and "loss_cls=" in err
    for remedy in ("SOLVER.WARMUP_ITERS", "SOLVER.BASE_LR (now 1e+06)", "FRN_LEPS",
                   "SOLVER.CLIP_GRADIENTS.ENABLED"):
        assert remedy in err
    assert "Traceback" not in err.split("ERROR (NonFiniteLossError)")[1]

    with open(tmp_path / "run_status.json") as f:
        status = json.load(f)
    assert status["state"] == "failed" and "NonFiniteLossError" in status["error"]
    assert status["iteration"] == failed_at
    # earlier checkpoints are byte-for-byte untouched
    assert {n: sha(tmp_path / n) for n in before} == before
    # no checkpoint from the failed step or later; every checkpoint holds finite weights
    iters = sorted(int(m.group(1)) for n in os.listdir(tmp_path)
                   if (m := re.match(r"model_(\d+)\.pth$", n)))
    assert iters and max(iters) < failed_at
    for n in os.listdir(tmp_path):
        if n.endswith(".pth"):
            state = torch.load(tmp_path / n, weights_only=True)["model"]
            assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())
    assert (tmp_path / "last_checkpoint").read_text() == f"model_{max(iters):07d}.pth"
    assert f"model_{max(iters):07d}.pth" in err  # the message names the last good checkpoint
