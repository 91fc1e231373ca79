"""Issue 13 item 6: PreciseBN (TEST.PRECISE_BN, as detectron2's SyncBN Mask R-CNN configs) runs
through d2_norms' Trainer on CPU: the hook is installed, it re-estimates the BN statistics at the
end of training, and nothing else of the run changes."""
import os

import pytest

import torch
from detectron2.engine import hooks

import d2_norms  # noqa: F401
from d2_norms.engine import Trainer
from d2_norms.engine.defaults import setup_cfg

pytestmark = pytest.mark.slow

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(REPO, "configs", "synthetic", "mask_rcnn_R18_FPN_GN.yaml")
TINY = ["DATASETS.TRAIN", "('synthetic_shapes_tiny_train',)", "DATASETS.TEST", "()",
        "DATALOADER.NUM_WORKERS", "0", "SOLVER.IMS_PER_BATCH", "2", "SOLVER.BASE_LR", "0.01",
        "SOLVER.WARMUP_ITERS", "1", "SOLVER.STEPS", "()", "SOLVER.MAX_ITER", "2",
        "SOLVER.CHECKPOINT_PERIOD", "1000", "INPUT.MIN_SIZE_TRAIN", "(64,)",
        "INPUT.MAX_SIZE_TRAIN", "64", "MODEL.DEVICE", "cpu", "TEST.EVAL_PERIOD", "0",
        # the BN cells' layout: BN in backbone, FPN and RoI heads
        "MODEL.RESNETS.NORM", "BN", "MODEL.FPN.NORM", "BN", "MODEL.ROI_BOX_HEAD.NORM", "BN",
        "MODEL.ROI_MASK_HEAD.NORM", "BN"]


def _train(tmp_path, precise: bool):
    class Args:
        config_file = CONFIG
    Args.opts = TINY + ["TEST.PRECISE_BN.ENABLED", str(precise), "TEST.PRECISE_BN.NUM_ITER", "3",
                        "OUTPUT_DIR", str(tmp_path / f"precise_{precise}")]
    cfg = setup_cfg(Args, log=False)
    torch.manual_seed(0)
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=False)
    installed = [h for h in trainer._hooks if isinstance(h, hooks.PreciseBN)]
    calls = []
    for h in installed:  # count the re-estimations without changing what they do
        original = h.update_stats
        h.update_stats = lambda original=original: (calls.append(trainer.iter), original())[1]
    trainer.train()
    bn = trainer.model.backbone.bottom_up.res2[0].conv1.norm
    return installed, calls, bn.running_mean.clone(), bn.running_var.clone()


def test_precise_bn_runs_on_cpu_and_reestimates_statistics(tmp_path):
    installed, calls, mean_on, var_on = _train(tmp_path, True)
    assert len(installed) == 1 and calls == [1]  # once, after the last of 2 iterations
    none, no_calls, mean_off, var_off = _train(tmp_path, False)
    assert not none and not no_calls
    # Same seed, same 2 training steps: only PreciseBN's re-estimation (3 batches, cumulative
    # average instead of momentum 0.1) differs.
    assert torch.isfinite(mean_on).all() and torch.isfinite(var_on).all()
    assert not torch.allclose(mean_on, mean_off)
    # Momentum 0.1 over 2 steps keeps ~0.81 of the initial variance 1; a cumulative average of
    # batch variances does not.
    assert float((var_off - 1).abs().max()) < float((var_on - 1).abs().max())
