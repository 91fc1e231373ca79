"""`tools/reproduce.py synthetic-study` (issue 14): its cells and every command's settings against
the protocol computed here independently (same images at every batch size, lr linear in the
batch, warm-up / lr steps in images, one seed, every norm key set), resuming / skipping /
divergence handling, the synthetic RetinaNet config, and one tiny cell end to end."""
import json
import os
import pathlib
import shlex
import subprocess
import sys

import pytest

import d2_norms  # noqa: F401

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "tools"))
import reproduce  # noqa: E402

TOOL = os.path.join(REPO, "tools", "reproduce.py")
MASK_NORMS = ("BN", "GN", "GNWS", "FRN", "NF")
RETINA_NORMS = ("BN", "GN", "FRN")
BATCHES = (1, 2, 4, 8)
NORM_KEYS = {
    "mask_rcnn": ("MODEL.RESNETS.NORM", "MODEL.FPN.NORM", "MODEL.RPN.NORM",
                  "MODEL.ROI_BOX_HEAD.NORM", "MODEL.ROI_MASK_HEAD.NORM"),
    "retinanet": ("MODEL.RESNETS.NORM", "MODEL.FPN.NORM", "MODEL.RETINANET.NORM"),
}
CONFIGS = {"mask_rcnn": "configs/synthetic/mask_rcnn_R18_FPN_GN.yaml",
           "retinanet": "configs/synthetic/retinanet_R18_FPN_GN.yaml"}


def dry_run(*args):
    out = subprocess.run([sys.executable, TOOL, "synthetic-study", "--dry-run", *args],
                         capture_output=True, text=True, timeout=300)
    return out


def parse_train_line(line):
    """(flags, {KEY: value string}) of one printed train_net command."""
    words = shlex.split(line.split(maxsplit=1)[1])
    assert words[1].endswith(os.path.join("tools", "train_net.py"))
    flags, i = {}, 2
    while i < len(words) and words[i].startswith("--"):
        if words[i] == "--resume":
            flags["--resume"] = True
            i += 1
        else:
            flags[words[i]] = words[i + 1]
            i += 2
    rest = words[i:]
    assert len(rest) % 2 == 0
    return flags, dict(zip(rest[::2], rest[1::2]))


@pytest.fixture(scope="module")
def full_dry_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("study")
    out = dry_run("--epochs", "2.4", "--output-root", str(root))
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    train = [parse_train_line(line) for line in lines
             if line.startswith("[dry-run]") and "train_net.py" in line]
    return root, lines, train


def test_cells_are_both_sweeps_at_every_batch_size():
    cells = reproduce.study_cells()
    expected = ({("mask_rcnn", n, b) for n in MASK_NORMS for b in BATCHES}
                | {("retinanet", n, b) for n in RETINA_NORMS for b in BATCHES})
    assert {(c.detector, c.norm, c.ims) for c in cells} == expected and len(cells) == 32
    assert len({c.name for c in cells}) == 32
    assert [(c.detector, c.ims) for c in reproduce.study_cells(["retinanet"], ["BN"])] == [
        ("retinanet", b) for b in BATCHES]
    with pytest.raises(ValueError, match="GNWS"):
        reproduce.study_cells(["retinanet"], ["GNWS"])
    with pytest.raises(ValueError, match="3"):
        reproduce.study_cells(batches=[3])


def test_every_command_follows_the_protocol(full_dry_run):
    root, lines, train = full_dry_run
    assert len(train) == 32
    assert lines[0].startswith("synthetic-study: 32 runs, 2400 images each")
    images = 2400  # 2.4 epochs of the 1000-image synthetic_shapes_train
    by_detector = {"mask_rcnn": [], "retinanet": []}
    seen = set()
    for flags, kv in train:
        out = kv["OUTPUT_DIR"]
        name = os.path.basename(out)
        detector = "retinanet" if name.startswith("retinanet") else "mask_rcnn"
        norm, ims = name.split("_")[-2], int(name.split("_")[-1][:-3])
        seen.add((detector, norm, ims))
        assert os.path.dirname(out) == str(root)
        assert flags == {"--num-gpus": "1", "--config-file": os.path.join(REPO, CONFIGS[detector])}
        b = int(kv["SOLVER.IMS_PER_BATCH"])
        assert b == ims and kv["SOLVER.REFERENCE_WORLD_SIZE"] == "0"
        # the same images at every batch size, lr linear in the batch (0.02 at 4 images)
        assert int(kv["SOLVER.MAX_ITER"]) * b == images
        assert float(kv["SOLVER.BASE_LR"]) == pytest.approx(0.02 * b / 4, rel=1e-12)
        # the same warm-up, checkpoint and PreciseBN images
        assert int(kv["SOLVER.WARMUP_ITERS"]) * b == 200
        assert int(kv["SOLVER.CHECKPOINT_PERIOD"]) * b == 400
        steps = eval(kv["SOLVER.STEPS"])  # noqa: S307 - our own printed tuple
        if detector == "mask_rcnn":
            assert kv["SOLVER.LR_SCHEDULER_NAME"] == "WarmupMultiStepLR"
            assert kv["SOLVER.WARMUP_METHOD"] == "linear"
            # lr x0.1 after 75% and 92.5% of the images (to a multiple of the largest batch)
            assert [s * b for s in steps] == [1800, 2216]
            assert kv["MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE"] == "64"
        else:
            assert kv["SOLVER.LR_SCHEDULER_NAME"] == "WarmupCosineLR"
            assert kv["SOLVER.WARMUP_METHOD"] == "cosine" and steps == ()
        # one seed, CPU, the synthetic set
        assert kv["SEED"] == "1" and kv["MODEL.DEVICE"] == "cpu"
        assert kv["DATASETS.TRAIN"] == "('synthetic_shapes_train',)"
        assert kv["DATASETS.TEST"] == "('synthetic_shapes_val',)"
        # every norm key set, consistently: the normalizer everywhere; the RPN head Scaled WS
        # for NF only (NF sec. 4.5), unnormalized otherwise
        for key in NORM_KEYS[detector]:
            want = ("NF" if norm == "NF" else "") if key == "MODEL.RPN.NORM" else norm
            assert kv[key] == want, (name, key)
        # the project's RetinaNet recipe (FRN Table 6's TPU head): one norm per pyramid level
        assert kv.get("MODEL.RETINANET.NORM_PER_LEVEL") == (
            "True" if detector == "retinanet" else None)
        agc = {"SOLVER.CLIP_GRADIENTS.ENABLED": "True",
               "SOLVER.CLIP_GRADIENTS.CLIP_TYPE": "agc",
               "SOLVER.CLIP_GRADIENTS.CLIP_VALUE": "0.04"}
        assert all(kv.get(k) == v for k, v in agc.items()) == (norm == "NF")
        # PreciseBN (the recipe's BN Mask R-CNN cells) on the same 200 images at every batch
        precise = detector == "mask_rcnn" and norm == "BN"
        assert (kv.get("TEST.PRECISE_BN.ENABLED") == "True") == precise
        assert ("TEST.PRECISE_BN.NUM_ITER" in kv) == precise
        if precise:
            assert int(kv["TEST.PRECISE_BN.NUM_ITER"]) * b == 200
        by_detector[detector].append(kv)
    assert len(seen) == 32
    assert "ap_table.py" in lines[-3] and lines[-3].endswith(
        "-o " + shlex.quote(os.path.join(str(root), "ap_table.md")))
    assert "plot_ap.py" in lines[-2] and lines[-2].endswith(
        shlex.quote(os.path.join(str(root), "study_synthetic.png")))
    assert "plot_ap.py" in lines[-1] and lines[-1].endswith(
        shlex.quote(os.path.join(str(root), "study_synthetic_mask.png")) + " --task segm")
    # the default output root plots into docs/
    assert reproduce.STUDY_PLOT == os.path.join(REPO, "docs", "study_synthetic.png")


def test_commands_build_the_configs_they_say(full_dry_run):
    """Each printed command, merged as train_net merges it, gives the intended config."""
    from d2_norms.engine.defaults import argument_parser, setup_cfg

    _, _, train = full_dry_run
    for flags, kv in train:
        args = [a for k, v in kv.items() for a in (k, v)]
        cfg = setup_cfg(argument_parser().parse_args(
            ["--config-file", flags["--config-file"], *args]), log=False)
        b = cfg.SOLVER.IMS_PER_BATCH
        assert cfg.SOLVER.MAX_ITER * b == 2400 and cfg.DATASETS.TRAIN == ("synthetic_shapes_train",)
        assert isinstance(cfg.SOLVER.STEPS, tuple) and cfg.MODEL.DEVICE == "cpu"
        if kv["MODEL.RESNETS.NORM"] != "NF":
            assert cfg.MODEL.FPN.NORM == cfg.MODEL.RESNETS.NORM
        assert cfg.SEED == 1


def test_epochs_must_give_the_same_images_at_every_batch():
    assert reproduce.study_images(1.6, 1000) == 1600
    with pytest.raises(ValueError, match="multiple of 8"):
        reproduce.study_images(1.0, 1001)
    with pytest.raises(ValueError, match="multiple of 8"):
        reproduce.study_images(0.0, 1000)

def test_bad_epochs_are_a_usage_error(capsys):
    with pytest.raises(SystemExit) as e:
        reproduce.main(["synthetic-study", "--dry-run", "--epochs", "1.001"])
    assert e.value.code == 2 and "multiple of 8" in capsys.readouterr().err


def _status(directory, **status):
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "run_status.json").write_text(json.dumps(status))


def test_finished_skipped_diverged_kept_interrupted_resumed(tmp_path, capsys):
    names = {b: f"mask_rcnn_R18_FPN_GN_{b}img" for b in BATCHES}
    _status(tmp_path / names[1], state="finished")
    _status(tmp_path / names[2], state="failed",
            error="NonFiniteLossError: loss became non-finite at iteration 7")
    _status(tmp_path / names[4], state="running")
    assert reproduce.main(["synthetic-study", "--dry-run", "--detectors", "mask_rcnn",
                           "--norms", "GN", "--output-root", str(tmp_path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert f"[done]     {names[1]}" in lines
    assert any(line.startswith(f"[diverged] {names[2]}: NonFiniteLossError") for line in lines)
    train = {os.path.basename(kv["OUTPUT_DIR"]): flags
             for flags, kv in (parse_train_line(line) for line in lines if "train_net.py" in line)}
    assert set(train) == {names[4], names[8]}
    assert train[names[4]].get("--resume") and not train[names[8]].get("--resume")
    # a failure that is not a divergence resumes too
    _status(tmp_path / names[2], state="failed", error="RuntimeError: killed")
    assert reproduce.cell_state(str(tmp_path / names[2])) == "failed"


class FakeTraining:
    """Stands in for a train_net process: writes the run's outcome, exits with ``code``."""

    def __init__(self, cmd, outcome, live):
        self.cmd, self.returncode, self._polls = cmd, None, 0
        self.outcome, self.live = outcome, live
        live.append(self)

    def poll(self):
        self._polls += 1
        if self._polls < 2:  # running for a while
            return None
        if self.returncode is None:
            out = pathlib.Path(self.cmd[self.cmd.index("OUTPUT_DIR") + 1])
            state, error, self.returncode = self.outcome
            _status(out, state=state, **({"error": error} if error else {}))
            if state == "finished":
                for name in ("model_0000099.pth", "model_final.pth"):
                    (out / name).write_bytes(b"")
            self.live.remove(self)
        return self.returncode

    def wait(self):
        while self.poll() is None:
            pass
        return self.returncode


def fake_study(monkeypatch, outcomes):
    """Patch the study's process start (outcome per run-name suffix, default finished) and the
    table / plot calls; return (started commands, report commands, concurrency record)."""
    started, reports, live, most = [], [], [], [0]

    def start(cmd, env, log):
        started.append(cmd)
        name = os.path.basename(cmd[cmd.index("OUTPUT_DIR") + 1])
        outcome = next((o for suffix, o in outcomes.items() if name.endswith(suffix)),
                       ("finished", None, 0))
        if callable(outcome):
            outcome = outcome(cmd)
        proc = FakeTraining(cmd, outcome, live)
        most[0] = max(most[0], len(live))
        return proc

    monkeypatch.setattr(reproduce, "_start", start)
    monkeypatch.setattr(reproduce.time, "sleep", lambda s: None)
    monkeypatch.setattr(reproduce.subprocess, "call", lambda cmd: reports.append(cmd) or 0)
    return started, reports, most


def test_a_diverged_cell_is_recorded_and_the_sweep_goes_on(tmp_path, monkeypatch, capsys):
    """train_net exit 1 with a non-finite loss recorded: diverged, the study continues; any
    other failure stops it (to be fixed and resumed)."""
    diverged = ("failed", "NonFiniteLossError: loss became non-finite at iteration 3", 1)
    # an uncaught exception exits 1 too, but is not a divergence; resumed, it finishes
    bug = lambda cmd: (("finished", None, 0) if "--resume" in cmd  # noqa: E731
                       else ("failed", "RuntimeError: a bug", 1))
    started, reports, _ = fake_study(monkeypatch, {"_BN_1img": diverged, "_GN_2img": bug})
    args = ["synthetic-study", "--detectors", "mask_rcnn", "--norms", "BN", "GN",
            "--output-root", str(tmp_path)]
    assert reproduce.main(args) == 1  # stopped at GN_2img
    trained = [os.path.basename(c[c.index("OUTPUT_DIR") + 1]) for c in started]
    assert trained == ["mask_rcnn_R18_FPN_BN_1img", "mask_rcnn_R18_FPN_GN_1img",
                       "mask_rcnn_R18_FPN_BN_2img", "mask_rcnn_R18_FPN_GN_2img"]
    assert reports == []  # no table after a failure
    status = json.loads((tmp_path / "study_cells.json").read_text())
    assert status["mask_rcnn_R18_FPN_BN_1img"]["outcome"] == "diverged"
    assert status["mask_rcnn_R18_FPN_BN_1img"]["exit_code"] == 1
    assert status["mask_rcnn_R18_FPN_GN_1img"]["outcome"] == "finished"
    assert status["mask_rcnn_R18_FPN_GN_2img"]["outcome"] == "failed"
    # a finished run keeps model_final.pth only
    assert sorted(os.listdir(tmp_path / "mask_rcnn_R18_FPN_GN_1img")) == [
        "model_final.pth", "run_status.json"]
    assert "GN_2img failed (exit 1, run state failed)" in capsys.readouterr().err
    # started again: the diverged cell is not retried, the failed one resumes, then the
    # table and the plot
    started.clear()
    assert reproduce.main(args) == 0
    assert started[0][started[0].index("OUTPUT_DIR") + 1].endswith("GN_2img")
    assert "--resume" in started[0]
    assert not any("BN_1img" in " ".join(c) for c in started)
    assert len(started) == 5  # GN_2img, then the 4 and 8 image cells
    # box AP, and mask AP for Mask R-CNN
    assert [os.path.basename(c[1]) for c in reports] == ["ap_table.py", "plot_ap.py",
                                                         "plot_ap.py"]
    assert reports[2][-3:] == [str(tmp_path / "study_synthetic_mask.png"), "--task", "segm"]
    assert "diverged (1): mask_rcnn_R18_FPN_BN_1img" in capsys.readouterr().out


def test_bn_without_batch_statistics_is_a_result_not_a_bug(tmp_path, monkeypatch, capsys):
    """RetinaNet BN at one 128 px image: P7 is 1x1, so BN has one value per channel and torch
    refuses. The study records that cell as "no batch statistics" and goes on; not retried."""
    refused = ("failed", "ValueError: Expected more than 1 value per channel when training, "
               "got input size torch.Size([1, 128, 1, 1])", 1)
    started, reports, _ = fake_study(monkeypatch, {"_BN_1img": refused})
    args = ["synthetic-study", "--detectors", "retinanet", "--output-root", str(tmp_path)]
    assert reproduce.main(args) == 0
    assert len(started) == 12 and len(reports) == 2  # every cell, then the table and box plot
    status = json.loads((tmp_path / "study_cells.json").read_text())
    assert status["retinanet_R18_FPN_BN_1img"]["outcome"] == "no batch statistics"
    assert "no batch statistics (1): retinanet_R18_FPN_BN_1img" in capsys.readouterr().out
    started.clear()
    assert reproduce.main(args) == 0 and started == []  # kept as a result
    # any other ValueError is a failure to fix
    other = tmp_path / "other"
    _status(other, state="failed", error="ValueError: a bug")
    assert reproduce.cell_state(str(other)) == "failed"


def test_jobs_train_cells_side_by_side_and_a_failure_lets_running_ones_finish(
        tmp_path, monkeypatch, capsys):
    started, reports, most = fake_study(
        monkeypatch, {"_GN_2img": ("failed", "RuntimeError: a bug", 1)})
    args = ["synthetic-study", "--detectors", "retinanet", "--output-root", str(tmp_path),
            "--jobs", "2", "--threads", "1"]
    assert reproduce.main(args) == 1
    assert most[0] == 2
    names = [os.path.basename(c[c.index("OUTPUT_DIR") + 1]) for c in started]
    # nothing new starts after the failure (cells in order: 1, 2, 4, 8 images); the run
    # beside it was waited for and finished
    assert names == [c.name for c in reproduce.study_cells(["retinanet"])][:len(names)]
    assert "retinanet_R18_FPN_GN_2img" in names
    assert not any(n.endswith(("_4img", "_8img")) for n in names)
    status = json.loads((tmp_path / "study_cells.json").read_text())
    assert {n: status[n]["outcome"] for n in names} == {
        n: ("failed" if n.endswith("GN_2img") else "finished") for n in names}
    assert all(v["threads"] == 1 and v["jobs"] == 2 for v in status.values())
    out = capsys.readouterr().out
    assert "OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 " in out and "console.txt" in out
    assert reports == []


def test_retinanet_config_anchors_fit_the_shapes_and_it_builds_for_each_norm():
    import torch
    from detectron2.data import MetadataCatalog

    from d2_norms.engine.defaults import argument_parser, setup_cfg
    from d2_norms.engine.trainer import Trainer

    path = os.path.join(REPO, CONFIGS["retinanet"])
    cfg = setup_cfg(argument_parser().parse_args(["--config-file", path]), log=False)
    assert cfg.MODEL.META_ARCHITECTURE == "D2NormsRetinaNet"
    assert cfg.MODEL.BACKBONE.NAME == "build_d2n_retinanet_resnet_fpn_backbone"
    assert cfg.MODEL.RESNETS.DEPTH == 18 and cfg.MODEL.FPN.OUT_CHANNELS == 128
    assert cfg.MODEL.RETINANET.NUM_CLASSES == len(
        MetadataCatalog.get(cfg.DATASETS.TRAIN[0]).thing_classes) == 3
    sizes = cfg.MODEL.ANCHOR_GENERATOR.SIZES
    # P3-P7 (strides 8-128): base anchor 2x the stride (COCO's 4x leaves 11-30 px objects
    # without an anchor of IoU 0.5), three octave scales each
    assert len(sizes) == 5 and all(len(s) == 3 for s in sizes)
    assert [s[0] for s in sizes] == [16, 32, 64, 128, 256]
    assert all(s[1] == pytest.approx(s[0] * 2 ** (1 / 3), rel=1e-3)
               and s[2] == pytest.approx(s[0] * 2 ** (2 / 3), rel=1e-3) for s in sizes)
    assert cfg.INPUT.MIN_SIZE_TEST == cfg.INPUT.MAX_SIZE_TEST == 128
    for norm in RETINA_NORMS:
        overrides = reproduce.study_norm_settings("retinanet", norm)
        c = cfg.clone()
        c.defrost()
        c.merge_from_list([a for k, v in overrides.items()
                           for a in (k, reproduce.format_override(v))])
        c.MODEL.DEVICE = "cpu"
        torch.manual_seed(0)
        model = Trainer.build_model(c).eval()
        with torch.no_grad():
            out = model([{"image": torch.zeros(3, 128, 128), "height": 128, "width": 128}])
        assert "instances" in out[0]


def test_the_protocol_table_in_the_docs_is_the_default_schedule():
    """docs/study_synthetic.md quotes the schedule the default command trains."""
    import re

    with open(os.path.join(REPO, "docs", "study_synthetic.md")) as f:
        text = f.read()
    images = reproduce.study_images(reproduce.STUDY_EPOCHS, 1000)
    assert f"{reproduce.STUDY_EPOCHS:.1f} nominal epoch = {images} images" in text
    rows = re.findall(r"^\| (\d) \| (\d+) \| ([\d.]+) \| (\d+) \| (\d+), (\d+) \| (\d+) \|$",
                      text, re.M)
    assert [int(r[0]) for r in rows] == list(BATCHES)
    for ims, iters, lr, warmup, s1, s2, ckpt in rows:
        sched = reproduce.study_schedule("mask_rcnn", int(ims), images)
        assert (sched["SOLVER.MAX_ITER"], sched["SOLVER.BASE_LR"], sched["SOLVER.WARMUP_ITERS"],
                sched["SOLVER.STEPS"], sched["SOLVER.CHECKPOINT_PERIOD"]) == (
            int(iters), float(lr), int(warmup), (int(s1), int(s2)), int(ckpt))


@pytest.mark.slow
def test_one_tiny_cell_runs_end_to_end_and_ap_table_reads_it(tmp_path):
    root = tmp_path / "study"
    plot = tmp_path / "study.png"
    cmd = [sys.executable, TOOL, "synthetic-study", "--detectors", "mask_rcnn", "--norms", "GN",
           "--batches", "2", "--train-set", "synthetic_shapes_tiny_train",
           "--test-set", "synthetic_shapes_tiny_val", "--epochs", "1", "--warmup-images", "4",
           "--output-root", str(root), "--plot", str(plot),
           "INPUT.MIN_SIZE_TRAIN", "(64,)", "INPUT.MAX_SIZE_TRAIN", "64",
           "INPUT.MIN_SIZE_TEST", "64", "INPUT.MAX_SIZE_TEST", "64",
           "DATALOADER.NUM_WORKERS", "0", "SOLVER.CHECKPOINT_PERIOD", "6",
           # 12 iterations: keep every detection, so that there is an AP to plot
           "MODEL.ROI_HEADS.SCORE_THRESH_TEST", "0.0", "TEST.DETECTIONS_PER_IMAGE", "20"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    run = root / "mask_rcnn_R18_FPN_GN_2img"
    for name in ("config.yaml", "metrics.json", "results.json", "model_final.pth"):
        assert (run / name).exists(), name
    assert not list(run.glob("model_0*.pth"))  # the checkpoint of iteration 6 was pruned
    assert json.loads((run / "run_status.json").read_text())["state"] == "finished"
    status = json.loads((root / "study_cells.json").read_text())
    assert status["mask_rcnn_R18_FPN_GN_2img"]["outcome"] == "finished"
    assert (root / "ap_table.md").exists() and "| GN |" in (root / "ap_table.md").read_text()
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = subprocess.run([sys.executable, os.path.join(REPO, "tools", "ap_table.py"),
                            str(run), "--json"], capture_output=True, text=True, timeout=300)
    assert table.returncode == 0, table.stderr
    data = json.loads(table.stdout)
    (entry,) = data["runs"]
    assert entry["status"] == "finished" and entry["run"]["images_per_gpu"] == 2
    assert entry["run"]["max_iter"] == 12 and entry["run"]["normalizer"] == "GN"
    assert set(entry["evaluations"]) == {"synthetic_shapes_tiny_val"}
    assert {"bbox", "segm"} <= set(entry["evaluations"]["synthetic_shapes_tiny_val"]["metrics"])
    (tab,) = data["tables"]
    assert tab["detector"].startswith("Mask R-CNN") and tab["images_per_gpu"] == [2]
    (row,) = tab["rows"]
    assert row["normalizer"] == "GN"
    assert {(c["task"], c["metric"]) for c in row["cells"] if c["n"] == 1} >= {
        ("bbox", "AP"), ("segm", "AP")}
    # started again: the finished cell is skipped
    again = subprocess.run(cmd + ["--dry-run"], capture_output=True, text=True, timeout=300)
    assert "[done]     mask_rcnn_R18_FPN_GN_2img" in again.stdout
    assert "train_net.py" not in again.stdout
