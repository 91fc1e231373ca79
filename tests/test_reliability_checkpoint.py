"""Atomic checkpoints, RNG state round trips, the resumable data order and the non-finite guards
(fast, in-process; the end-to-end kill/resume run is in test_reliability_resume.py)."""
import os
import random
import signal
import time
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from detectron2.config import get_cfg
from detectron2.utils.events import EventStorage

from d2_norms.config import add_d2_norms_config
from d2_norms.engine.checkpoint import (AtomicCheckpointer, CheckpointHook, capture_rng_state,
                                        is_complete_checkpoint, isolated_rng,
                                        remove_stale_temp_files, restore_rng_state)
from d2_norms.engine.errors import NonFiniteLossError, NonFiniteWeightsError
from d2_norms.engine.train_loader import (ResumableBatchSampler, SampleStream, SeededMapDataset,
                                          derive_seed)
from d2_norms.engine.trainer import CheckedSimpleTrainer, Trainer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def small_model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))


# --------------------------------------------------------------------------- atomic checkpoints
def test_save_writes_complete_file_then_pointer(tmp_path):
    ckpt = AtomicCheckpointer(small_model(), str(tmp_path))
    ckpt.save("model_0000004", iteration=4)
    assert (tmp_path / "last_checkpoint").read_text() == "model_0000004.pth"
    assert is_complete_checkpoint(str(tmp_path / "model_0000004.pth"))
    assert torch.load(tmp_path / "model_0000004.pth", weights_only=True)["iteration"] == 4
    assert sorted(os.listdir(tmp_path)) == ["last_checkpoint", "model_0000004.pth"]


def test_failed_write_leaves_previous_checkpoint_and_pointer(tmp_path, monkeypatch):
    model = small_model()
    ckpt = AtomicCheckpointer(model, str(tmp_path))
    ckpt.save("model_0000004")
    before = (tmp_path / "model_0000004.pth").read_bytes()

    def dies_halfway(obj, f):
        f.write(b"PK\x03\x04 half a checkpoint")
        raise OSError("No space left on device")

    monkeypatch.setattr(torch, "save", dies_halfway)
    with pytest.raises(OSError, match="No space"):
        ckpt.save("model_0000009")
    # nothing named model_0000009.pth, no temporary file, pointer and old file untouched
    assert sorted(os.listdir(tmp_path)) == ["last_checkpoint", "model_0000004.pth"]
    assert (tmp_path / "last_checkpoint").read_text() == "model_0000004.pth"
    assert (tmp_path / "model_0000004.pth").read_bytes() == before


def test_pointer_to_truncated_file_falls_back_to_newest_complete(tmp_path, caplog):
    ckpt = AtomicCheckpointer(small_model(), str(tmp_path))
    ckpt.save("model_0000004")
    time.sleep(0.01)
    ckpt.save("model_0000009")
    data = (tmp_path / "model_0000009.pth").read_bytes()
    # what a non-atomic writer killed mid-write leaves: the newest file cut short
    (tmp_path / "model_0000014.pth").write_bytes(data[: len(data) // 2])
    (tmp_path / "last_checkpoint").write_text("model_0000014.pth")
    assert not is_complete_checkpoint(str(tmp_path / "model_0000014.pth"))
    with caplog.at_level("WARNING"):
        assert ckpt.get_checkpoint_file() == str(tmp_path / "model_0000009.pth")
    assert "incomplete" in caplog.text
    (tmp_path / "last_checkpoint").write_text("model_0000099.pth")
    assert ckpt.get_checkpoint_file() == str(tmp_path / "model_0000009.pth")


def test_stale_temp_files_are_removed(tmp_path):
    (tmp_path / ".model_0000009.pth.tmp-4242").write_bytes(b"partial")
    (tmp_path / ".last_checkpoint.tmp-4242").write_bytes(b"x")
    (tmp_path / "model_0000004.pth").write_bytes(b"kept")
    removed = remove_stale_temp_files(str(tmp_path))
    assert sorted(removed) == [".last_checkpoint.tmp-4242", ".model_0000009.pth.tmp-4242"]
    assert os.listdir(tmp_path) == ["model_0000004.pth"]


def _writer_loop(out_dir, ready_fd):
    """Child process: save checkpoints of an ~8 MB model in a loop until killed."""
    try:
        torch.set_num_threads(1)
        ckpt = AtomicCheckpointer(torch.nn.Linear(1024, 2048), out_dir)
        i = 0
        while True:
            ckpt.save(f"model_{i:07d}", iteration=i)
            if i == 0:
                os.write(ready_fd, b"1")
            i += 1
    finally:
        os._exit(1)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_sigkill_during_writes_never_leaves_a_bad_pointer(tmp_path):
    """A writer saving in a loop is SIGKILLed at several moments; each time the pointer names a
    complete checkpoint that loads (a kill can land inside torch.save, fsync or the renames)."""
    out = tmp_path / "ckpts"
    for delay in (0.0, 0.05, 0.13, 0.31):
        read_fd, write_fd = os.pipe()
        pid = os.fork()
        if pid == 0:  # pragma: no cover - child
            os.close(read_fd)
            _writer_loop(str(out), write_fd)
        os.close(write_fd)
        assert os.read(read_fd, 1) == b"1"  # one save done: the pointer exists
        os.close(read_fd)
        time.sleep(delay)
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        name = (out / "last_checkpoint").read_text()
        loaded = torch.load(out / name, weights_only=True)
        assert name == f"model_{loaded['iteration']:07d}.pth"
        assert loaded["model"]["weight"].shape == (2048, 1024)
        # no half-written file under a checkpoint's name (a plain open+write would leave one)
        assert all(is_complete_checkpoint(str(f)) for f in out.glob("*.pth"))
        leftovers = [n for n in os.listdir(out) if n.startswith(".")]
        assert all(n.endswith(f".tmp-{pid}") for n in leftovers)
        remove_stale_temp_files(str(out))
        assert not [n for n in os.listdir(out) if n.startswith(".")]


# --------------------------------------------------------------------------------- RNG states
def test_rng_state_round_trip_through_a_weights_only_checkpoint(tmp_path):
    torch.manual_seed(3)
    np.random.seed(3)
    random.seed(3)
    state = capture_rng_state()
    expected = (torch.rand(5), np.random.rand(5), [random.random() for _ in range(5)])
    torch.save({"rng": [state]}, tmp_path / "s.pth")
    restore_rng_state(torch.load(tmp_path / "s.pth", weights_only=True)["rng"][0])
    again = (torch.rand(5), np.random.rand(5), [random.random() for _ in range(5)])
    assert torch.equal(expected[0], again[0])
    assert np.array_equal(expected[1], again[1])
    assert expected[2] == again[2]


def test_isolated_rng_undoes_draws():
    torch.manual_seed(0)
    with isolated_rng():
        torch.rand(100)
        np.random.rand(10)
    after = torch.rand(3)
    torch.manual_seed(0)
    assert torch.equal(after, torch.rand(3))


# ------------------------------------------------------------------------------ data order
def batches(sampler, n):
    it = iter(sampler)
    return [next(it) for _ in range(n)]


@pytest.mark.parametrize("grouped", [False, True])
@pytest.mark.parametrize("repeat", [False, True])
def test_sampler_resumed_at_k_continues_the_uninterrupted_sequence(grouped, repeat):
    n = 37
    groups = [i % 3 == 0 for i in range(n)] if grouped else None
    factors = [1.0 + (i % 4) * 0.4 for i in range(n)] if repeat else None
    for rank in range(2):
        def make(start):
            return ResumableBatchSampler(SampleStream(n, seed=5, repeat_factors=factors), 3,
                                         rank=rank, world_size=2, group_ids=groups,
                                         start_iter=start)
        full = batches(make(0), 40)
        for k in (1, 7, 13, 25):
            assert batches(make(k), 40 - k) == full[k:]


def test_ranks_split_the_global_stream_like_detectron2():
    n, per_rank, world = 10, 2, 3
    stream = SampleStream(n, seed=1)
    it = stream.iter_from(0)
    global_keys = [next(it) for _ in range(per_rank * world * 4)]
    for rank in range(world):
        got = sum(batches(ResumableBatchSampler(stream, per_rank, rank=rank, world_size=world),
                          4), [])
        # rank r takes positions r, r + world, ... of the global stream
        assert got == global_keys[rank::world]


def test_stream_is_a_permutation_per_epoch_and_depends_on_seed():
    s = SampleStream(20, seed=0)
    first = [i for _, i in zip(range(20), (k[1] for k in s.iter_from(0)))]
    assert sorted(first) == list(range(20))
    second = [k[1] for _, k in zip(range(20), s.iter_from(20))]
    assert sorted(second) == list(range(20)) and second != first
    other = [k[1] for _, k in zip(range(20), SampleStream(20, seed=1).iter_from(0))]
    assert other != first
    # jumping straight to position p gives the same keys as walking there
    walk = s.iter_from(0)
    keys = [next(walk) for _ in range(53)]
    assert [next(s.iter_from(p)) for p in (0, 19, 20, 52)] == [keys[p] for p in (0, 19, 20, 52)]


def test_repeat_factors_repeat_images_by_stochastic_rounding():
    factors = [1.0] * 10 + [3.5] * 10
    s = SampleStream(20, seed=2, repeat_factors=factors)
    counts = np.bincount(s.epoch(0), minlength=20)
    assert (counts[:10] == 1).all() and set(counts[10:]) <= {3, 4}


def test_seeded_map_dataset_augments_by_position_not_by_process_rng():
    def mapper(d):  # a random "augmentation" drawing from numpy, random and torch
        return (d["x"], np.random.rand(), random.random(), float(torch.rand(1)))

    ds = SeededMapDataset([{"x": i} for i in range(5)], mapper, seed=11)
    np.random.seed(0)
    outside = np.random.get_state()[1].copy()
    a = ds[(7, 2)]
    np.random.seed(123)  # the process RNG does not matter
    torch.manual_seed(5)
    b = ds[(7, 2)]
    assert a == b and a[0] == 2
    assert ds[(8, 2)][1:] != a[1:]  # another stream position: other draws
    np.random.seed(0)
    ds[(9, 1)]
    assert np.array_equal(np.random.get_state()[1], outside)  # caller's state restored
    assert derive_seed(11, 7, 0) != derive_seed(11, 8, 0)


# ------------------------------------------------------------------------- non-finite guards
def tiny_cfg():
    cfg = get_cfg()
    add_d2_norms_config(cfg)
    cfg.MODEL.RESNETS.NORM = "FRN"
    return cfg


class LossModel(torch.nn.Module):
    def __init__(self, value):
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(3))
        self.value = value

    def forward(self, batch):
        loss = self.w.sum()
        return {"loss_cls": loss * self.value, "loss_box_reg": loss}


def fake_trainer(model, cfg, iteration=7):
    fake = SimpleNamespace(model=model, cfg=cfg, max_iter=100, iter=iteration,
                           _trainer=SimpleNamespace(last_finite_losses=(6, {"loss_cls": 0.5})))
    fake._last_checkpoint_text = lambda: "/run/model_0000004.pth"
    return fake


def test_nan_loss_stops_before_the_optimizer_step_with_iteration_losses_and_remedies():
    model = LossModel(float("nan"))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    trainer = CheckedSimpleTrainer(model, [[{}]] * 3, optimizer)
    trainer.describe_failure = lambda it, per_rank, cause=None: Trainer._describe_non_finite_loss(
        fake_trainer(model, tiny_cfg()), it, per_rank, cause)
    with EventStorage(7) as storage:
        storage.iter = 7
        with pytest.raises(NonFiniteLossError) as info:
            trainer.run_step()
    message = str(info.value)
    assert "iteration 7 (of 100)" in message and "loss_cls is NaN/inf" in message
    assert "loss_cls=nan" in message and "loss_box_reg=3" in message
    for remedy in ("SOLVER.WARMUP_ITERS", "SOLVER.BASE_LR", "FRN_LEPS", "(this run uses FRN)",
                   "SOLVER.CLIP_GRADIENTS.ENABLED", "model_0000004.pth"):
        assert remedy in message
    assert torch.equal(model.w.detach(), torch.ones(3))  # optimizer.step() never ran


def test_finite_loss_is_logged_as_detectron2_does():
    model = LossModel(2.0)
    trainer = CheckedSimpleTrainer(model, [[{}]] * 3, torch.optim.SGD(model.parameters(), lr=0.1))
    with EventStorage(0) as storage:
        trainer.run_step()
        assert storage.latest()["total_loss"][0] == pytest.approx(9.0)
        assert storage.latest()["loss_cls"][0] == pytest.approx(6.0)
    assert not torch.equal(model.w.detach(), torch.ones(3))
    assert trainer.last_finite_losses[1] == {"loss_cls": 6.0, "loss_box_reg": 3.0}


def test_forward_divergence_is_reported_with_last_finite_losses():
    class Diverging(LossModel):
        def forward(self, batch):
            raise FloatingPointError("Predicted boxes or scores contain Inf/NaN. Training has "
                                     "diverged.")

    model = Diverging(1.0)
    trainer = CheckedSimpleTrainer(model, [[{}]], torch.optim.SGD(model.parameters(), lr=0.1))
    trainer.describe_failure = lambda it, per_rank, cause=None: Trainer._describe_non_finite_loss(
        fake_trainer(model, tiny_cfg()), it, per_rank, cause)
    with EventStorage(7):
        with pytest.raises(NonFiniteLossError, match="Predicted boxes") as info:
            trainer.run_step()
    assert "last finite step (iteration 6): loss_cls=0.5" in str(info.value)


def test_no_checkpoint_is_written_from_non_finite_weights(tmp_path):
    model = small_model()
    with torch.no_grad():
        model[2].weight[0, 0] = float("inf")
    checkpointer = AtomicCheckpointer(model, str(tmp_path))
    fake = fake_trainer(model, tiny_cfg(), iteration=9)
    fake.prepare_checkpoint = lambda: Trainer.prepare_checkpoint(fake)
    hook = CheckpointHook(checkpointer, period=5)
    hook.trainer = fake
    with pytest.raises(NonFiniteWeightsError, match=r"iteration 9 .*2\.weight"):
        hook.after_step()
    assert os.listdir(tmp_path) == []
    # finite weights: saved, with the RNG states of every process (one here)
    with torch.no_grad():
        model[2].weight[0, 0] = 0.0
    hook.after_step()
    assert sorted(os.listdir(tmp_path)) == ["last_checkpoint", "model_0000009.pth"]
    assert len(fake._rng_states) == 1
