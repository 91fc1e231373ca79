"""Bad input through tools/train_net.py's entry point: each case fails before any worker starts,
with a message saying what is wrong and how to fix it, and writes nothing into OUTPUT_DIR (an
existing run's files stay as they were). Most cases call ``run_cli`` in-process (fast); a few
run the real script in a subprocess."""
import hashlib
import json
import os
import subprocess
import sys

import pytest
import torch
from detectron2.data import MetadataCatalog

from d2_norms.engine.defaults import preflight, run_cli, setup_cfg
from d2_norms.engine.errors import BatchSizeError
from d2_norms.engine.preflight import check_batch_split, weights_problems
from d2_norms.engine.trainer import Trainer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(REPO, "configs", "synthetic", "mask_rcnn_R18_FPN_GN.yaml")
TINY = ["DATASETS.TRAIN", "('synthetic_shapes_tiny_train',)",
        "DATASETS.TEST", "('synthetic_shapes_tiny_val',)", "DATALOADER.NUM_WORKERS", "0",
        "INPUT.MIN_SIZE_TRAIN", "(64,)", "INPUT.MAX_SIZE_TRAIN", "64",
        "INPUT.MIN_SIZE_TEST", "64", "INPUT.MAX_SIZE_TEST", "64", "SOLVER.IMS_PER_BATCH", "2"]


def snapshot(directory):
    """{relative path: sha256} of every file under ``directory`` ({} if it does not exist)."""
    out = {}
    for root, _, files in os.walk(directory):
        for name in files:
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, directory)] = hashlib.sha256(f.read()).hexdigest()
    return out


def our_message(err):
    """The CLI's own message (what a logging handler of an earlier test, left pointing at a
    closed capture stream, may print before it is not ours)."""
    return err[err.index("ERROR ("):]


def cli_error(argv, capsys, code=2):
    with pytest.raises(SystemExit) as info:
        run_cli(argv)
    assert info.value.code == code
    err = capsys.readouterr().err
    assert "ERROR (" in err
    return err


@pytest.fixture(scope="module")
def gn_run(tmp_path_factory):
    """A run directory as training leaves it: config.yaml, a checkpoint, last_checkpoint."""
    run = tmp_path_factory.mktemp("gn_run")
    args = type("A", (), {"config_file": CONFIG, "opts": TINY + ["OUTPUT_DIR", str(run)]})
    cfg = setup_cfg(args, log=False)
    model = Trainer.build_model(cfg)
    (run / "config.yaml").write_text(cfg.dump())
    from d2_norms.config_checks import norm_record
    from d2_norms.engine.checkpoint import AtomicCheckpointer

    checkpointer = AtomicCheckpointer(model, str(run))
    checkpointer.record = norm_record(cfg)  # as the trainer sets it
    checkpointer.save("model_final", iteration=9)
    return run


@pytest.fixture
def existing_run(gn_run, tmp_path):
    """A copy of gn_run to point OUTPUT_DIR at (so a test can check nothing changed)."""
    import shutil

    dst = tmp_path / "run"
    shutil.copytree(gn_run, dst)
    return dst


# ------------------------------------------------------------------------------- config typos
def test_key_typo_in_config_file_names_file_and_close_key(tmp_path, capsys):
    bad = tmp_path / "my_experiment.yaml"
    bad.write_text(f'_BASE_: "{CONFIG}"\nSOLVER:\n  BASE_LRR: 0.1\n')
    out = tmp_path / "out"
    err = cli_error(["--config-file", str(bad), "OUTPUT_DIR", str(out)], capsys)
    assert "unknown config key 'SOLVER.BASE_LRR'" in err and str(bad) in err
    assert "Did you mean 'SOLVER.BASE_LR'?" in err
    assert not out.exists()


def test_key_typo_in_a_base_file_names_that_base(tmp_path, capsys):
    base = tmp_path / "base.yaml"
    base.write_text(f'_BASE_: "{CONFIG}"\nMODEL:\n  RESNETS:\n    NROM: "GN"\n')
    child = tmp_path / "child.yaml"
    child.write_text('_BASE_: "base.yaml"\n')
    err = cli_error(["--config-file", str(child)], capsys)
    assert f"in {base} (a _BASE_ of {child})" in err
    assert "'MODEL.RESNETS.NORM'" in err


def test_key_typo_on_command_line(capsys, existing_run):
    before = snapshot(existing_run)
    err = cli_error(["--config-file", CONFIG, "MODEL.RESNET.NORM", "GN",
                     "OUTPUT_DIR", str(existing_run)], capsys)
    assert "unknown config key 'MODEL.RESNET.NORM' in the command-line overrides" in err
    assert "Did you mean 'MODEL.RESNETS.NORM'?" in err
    assert snapshot(existing_run) == before


def test_missing_config_file(tmp_path, capsys):
    err = cli_error(["--config-file", str(tmp_path / "nope.yaml")], capsys)
    assert "nope.yaml does not exist" in err


# --------------------------------------------------------------------------------- normalizers
def test_unknown_norm_name_reaches_the_user_with_the_config_keys(existing_run, capsys):
    before = snapshot(existing_run)
    err = cli_error(["--config-file", CONFIG, *TINY, "MODEL.RESNETS.NORM", "GroupNorm",
                     "OUTPUT_DIR", str(existing_run)], capsys)
    assert "InputProblemsError" in err and "1 problem in" in err and "nothing was written" in err
    assert "MODEL.RESNETS.NORM='GroupNorm': unknown normalizer name" in err
    assert "Known names:" in err and " GNWS," in err
    assert snapshot(existing_run) == before  # config.yaml was not overwritten


def test_gn_groups_not_dividing_a_layer(existing_run, capsys):
    before = snapshot(existing_run)
    err = cli_error(["--config-file", CONFIG, *TINY, "MODEL.FPN.NORM", "GN_G48",
                     "OUTPUT_DIR", str(existing_run)], capsys)
    assert "1 problem in" in err and "GroupNormDivisibilityError:" in err
    assert "128 channels cannot be split into G=48 groups" in err
    assert "MODEL.FPN.NORM='GN_G48'" in err
    assert snapshot(existing_run) == before


# ---------------------------------------------------------------------------------- batch size
def test_total_batch_not_divisible_by_processes(tmp_path, capsys):
    err = cli_error(["--num-gpus", "2", "--config-file", CONFIG, *TINY,
                     "SOLVER.IMS_PER_BATCH", "3", "OUTPUT_DIR", str(tmp_path / "o")], capsys)
    assert "SOLVER.IMS_PER_BATCH=3 images cannot be split evenly over 2 processes" in err
    assert "REFERENCE_WORLD_SIZE" in err
    assert not (tmp_path / "o").exists()


def test_reference_world_size_not_dividing_the_batch(tmp_path, capsys):
    err = cli_error(["--config-file", CONFIG, *TINY, "SOLVER.IMS_PER_BATCH", "6",
                     "SOLVER.REFERENCE_WORLD_SIZE", "4", "OUTPUT_DIR", str(tmp_path / "o")],
                    capsys)
    assert "6/4 = 1.5 images per GPU, not a whole number" in err
    assert not (tmp_path / "o").exists()


def test_trainer_auto_scaling_raises_the_clear_error_instead_of_asserting():
    args = type("A", (), {"config_file": CONFIG, "opts": TINY + [
        "SOLVER.IMS_PER_BATCH", "6", "SOLVER.REFERENCE_WORLD_SIZE", "4"]})
    cfg = setup_cfg(args, log=False)
    with pytest.raises(BatchSizeError, match="1.5 images per GPU"):
        Trainer.auto_scale_workers(cfg, 2)
    args.opts = TINY + ["SOLVER.IMS_PER_BATCH", "8", "SOLVER.REFERENCE_WORLD_SIZE", "4"]
    cfg = setup_cfg(args, log=False)
    scaled = Trainer.auto_scale_workers(cfg, 2)  # valid: 2 per GPU kept
    assert scaled.SOLVER.IMS_PER_BATCH == 4
    check_batch_split(cfg, 3)  # auto-scaling makes any process count work


# -------------------------------------------------------------------------------------- weights
def test_eval_only_refuses_weights_of_another_normalizer(gn_run, tmp_path, capsys):
    out = tmp_path / "eval"
    err = cli_error(["--eval-only", "--config-file", CONFIG, *TINY, "MODEL.RESNETS.NORM", "FRN",
                     "MODEL.WEIGHTS", str(gn_run / "model_final.pth"), "OUTPUT_DIR", str(out)],
                    capsys)
    assert "refusing to evaluate" in err and "model_final.pth do not match" in err
    assert "not in the checkpoint (they would stay randomly initialised)" in err
    assert ".tau" in err  # FRN's TLU thresholds are what GN weights lack
    assert f"pass --config-file {gn_run / 'config.yaml'}" in err
    assert "MODEL.RESNETS.NORM: 'GN' there, 'FRN' here" in err
    assert "--allow-partial-weights" in err
    # the checkpoint records its normalizers: that is said too
    assert "trained (or converted) with other normalizers" in err
    assert "MODEL.RESNETS.NORM: 'GN' in the weights, 'FRN' in the config" in err
    assert not out.exists()  # no results.json, nothing


def test_eval_only_refuses_other_depth_with_shape_and_unexpected_keys(gn_run, tmp_path, capsys):
    err = cli_error(["--eval-only", "--config-file", CONFIG, *TINY, "MODEL.RESNETS.DEPTH", "34",
                     "MODEL.WEIGHTS", str(gn_run / "model_final.pth"),
                     "OUTPUT_DIR", str(tmp_path / "eval")], capsys)
    assert "model entries are not in the checkpoint" in err and "res2.2" in err
    assert "MODEL.RESNETS.DEPTH: 18 there, 34 here" in err


def test_eval_only_without_weights_is_refused(tmp_path, capsys):
    err = cli_error(["--eval-only", "--config-file", CONFIG, *TINY,
                     "OUTPUT_DIR", str(tmp_path / "eval")], capsys)
    assert "--eval-only needs weights" in err and "randomly initialised" in err


def test_eval_only_with_missing_weights_file(tmp_path, capsys):
    err = cli_error(["--eval-only", "--config-file", CONFIG, *TINY,
                     "MODEL.WEIGHTS", str(tmp_path / "gone.pth")], capsys)
    assert "gone.pth does not exist" in err


def test_allow_partial_weights_overrides_the_refusal(gn_run):
    args = argv_args(["--eval-only", "--allow-partial-weights", "--allow-norm-mismatch",
                      "--config-file", CONFIG, *TINY, "MODEL.RESNETS.NORM", "FRN",
                      "MODEL.WEIGHTS", str(gn_run / "model_final.pth")])
    preflight(args, 1)  # no error


@pytest.mark.parametrize("eval_only", [True, False])
def test_weights_of_another_normalizer_with_the_same_shapes_are_refused(gn_run, tmp_path,
                                                                         capsys, eval_only):
    """GN weights into the GN+WS model: every shape fits, the network is another one."""
    out = tmp_path / "o"
    argv = ["--config-file", CONFIG, *TINY, "MODEL.RESNETS.NORM", "GNWS", "MODEL.FPN.NORM",
            "GNWS", "MODEL.WEIGHTS", str(gn_run / "model_final.pth"), "OUTPUT_DIR", str(out)]
    err = cli_error((["--eval-only"] if eval_only else []) + argv, capsys)
    assert "other normalizers than the config builds" in err
    assert "MODEL.RESNETS.NORM: 'GN' in the weights, 'GNWS' in the config" in err
    assert "MODEL.FPN.NORM: 'GN' in the weights, 'GNWS' in the config" in err
    assert "--allow-norm-mismatch" in err and "do not match" not in err  # shapes fit
    assert not out.exists()
    args = argv_args((["--eval-only"] if eval_only else []) + ["--allow-norm-mismatch"] + argv)
    preflight(args, 1)  # asked for explicitly: allowed


@pytest.mark.parametrize("eval_only", [True, False])
@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_unreadable_weights_file_is_refused_before_anything_is_written(gn_run, tmp_path, capsys,
                                                                       eval_only, damage):
    data = (gn_run / "model_final.pth").read_bytes()
    bad = tmp_path / "bad.pth"
    bad.write_bytes(data[: len(data) // 2] if damage == "truncated" else b"not a checkpoint" * 9)
    out = tmp_path / "o"
    err = cli_error((["--eval-only"] if eval_only else [])
                    + ["--config-file", CONFIG, *TINY, "MODEL.WEIGHTS", str(bad),
                       "OUTPUT_DIR", str(out)], capsys)
    assert f"weights file {bad} cannot be read as a checkpoint" in err
    assert "Traceback" not in our_message(err) and not out.exists()


def test_training_records_the_normalizers_in_its_checkpoints(gn_run):
    from d2_norms.config_checks import NORM_RECORD

    saved = torch.load(gn_run / "model_final.pth", weights_only=False)
    assert saved[NORM_RECORD]["norms"] == {
        "MODEL.RESNETS.NORM": "GN", "MODEL.FPN.NORM": "GN", "MODEL.RPN.NORM": "",
        "MODEL.ROI_BOX_HEAD.NORM": "GN", "MODEL.ROI_MASK_HEAD.NORM": "GN"}


def test_no_config_file(capsys):
    err = cli_error([], capsys)
    assert "no --config-file given" in err


def test_every_problem_of_a_config_in_one_message(tmp_path, capsys):
    out = tmp_path / "o"
    err = cli_error(["--config-file", CONFIG, *TINY, "MODEL.RESNETS.NORM", "GroupNorm",
                     "MODEL.ROI_BOX_HEAD.NORM", "FNR", "SOLVER.IMS_PER_BATCH", "3",
                     "--num-gpus", "2", "MODEL.WEIGHTS", str(tmp_path / "gone.pth"),
                     "OUTPUT_DIR", str(out)], capsys)
    assert "4 problems in" in err, err
    for text in ("MODEL.RESNETS.NORM='GroupNorm'", "MODEL.ROI_BOX_HEAD.NORM='FNR'",
                 "cannot be split evenly over 2 processes", "gone.pth does not exist"):
        assert text in err, text
    assert "Traceback" not in our_message(err) and not out.exists()


@pytest.mark.parametrize("stock", ["COCO-Detection/retinanet_R_50_FPN_1x.yaml",
                                   "COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_1x.yaml"])
def test_detectron2_1x_yaml_with_d2_norms_names(stock_configs_dir, tmp_path, capsys, stock):
    """detectron2's own 1x YAMLs with d2_norms' names: every key to change in one message, exit
    code 2, OUTPUT_DIR never created."""
    out = tmp_path / "o"
    norms = ["MODEL.RESNETS.NORM", "FRN", "MODEL.FPN.NORM", "FRN"]
    heads = (["MODEL.RETINANET.NORM", "FRN", "MODEL.RETINANET.NUM_CLASSES", "3"]
             if "retinanet" in stock else
             ["MODEL.ROI_HEADS.NUM_CLASSES", "3", "MODEL.ROI_BOX_HEAD.NORM", "GNWS", "MODEL.ROI_BOX_HEAD.NUM_CONV", "4",
              "MODEL.ROI_MASK_HEAD.NORM", "NF", "MODEL.RPN.NORM", "GN"])
    err = cli_error(["--config-file", os.path.join(stock_configs_dir, stock), *TINY,
                     "MODEL.WEIGHTS", "", *norms, *heads, "OUTPUT_DIR", str(out)], capsys)
    keys = [heads[i] for i in range(0, len(heads), 2) if heads[i].endswith("NORM")]
    assert f"{2 + len(keys)} problems in" in err, err
    for key in ["MODEL.RESNETS.NORM", "MODEL.FPN.NORM"] + keys:
        assert f"{key}=" in err, key
    for use in ("build_d2n_", "D2NormsRetinaNet" if "retinanet" in stock else "D2NormsConvFCHead"):
        assert use in err
    assert "Traceback" not in our_message(err) and not out.exists()


def test_resume_with_a_changed_model_is_refused_and_keeps_the_run(existing_run, capsys):
    before = snapshot(existing_run)
    err = cli_error(["--resume", "--config-file", CONFIG, *TINY, "MODEL.ROI_BOX_HEAD.NUM_CONV",
                     "2", "OUTPUT_DIR", str(existing_run)], capsys)
    assert "refusing to resume" in err and "checkpoint entries have no place" in err
    assert snapshot(existing_run) == before


def test_resume_with_pointer_but_no_complete_checkpoint(existing_run, capsys):
    (existing_run / "model_final.pth").write_bytes(b"PK\x03\x04truncated")
    err = cli_error(["--resume", "--config-file", CONFIG, *TINY,
                     "OUTPUT_DIR", str(existing_run)], capsys)
    assert "no complete checkpoint" in err and "last_checkpoint" in err


def test_weights_problems_ignores_what_detectron2_recomputes():
    model = {"a.weight": (2, 3), "pixel_mean": (3, 1, 1), "anchor_generator.cell_anchors.0": (3, 4)}
    ckpt = {"module.a.weight": torch.zeros(2, 3), "module.extra": torch.zeros(1)}
    problems = weights_problems(model, ckpt)
    assert problems == {"missing": [], "unexpected": ["extra"], "shapes": []}
    assert weights_problems({"a.weight": (2, 4)}, {"a.weight": torch.zeros(2, 3)})["shapes"] == [
        ("a.weight", (2, 3), (2, 4))]


def argv_args(argv):
    from d2_norms.engine.defaults import argument_parser

    return argument_parser().parse_args(argv)


# -------------------------------------------------------------------------------------- datasets
@pytest.fixture
def coco_like(tmp_path, register_coco):
    """Register a small COCO-format dataset (copied from the tiny synthetic val set) whose files
    a test then breaks; unregistered afterwards."""
    import shutil

    meta = MetadataCatalog.get("synthetic_shapes_tiny_val")
    root = tmp_path / "data"
    shutil.copytree(meta.image_root, root / "images")
    shutil.copy(meta.json_file, root / "instances.json")
    name = register_coco(f"broken_{os.getpid()}_{id(tmp_path)}", root / "instances.json",
                         root / "images")
    return name, root


def data_argv(name, out, *extra):
    return ["--config-file", CONFIG, *TINY, "DATASETS.TRAIN", f"('{name}',)",
            "DATASETS.TEST", f"('{name}',)", *extra, "OUTPUT_DIR", str(out)]


def test_truncated_annotation_json(coco_like, tmp_path, capsys):
    name, root = coco_like
    text = (root / "instances.json").read_text()
    (root / "instances.json").write_text(text[: len(text) // 2])
    err = cli_error(data_argv(name, tmp_path / "o"), capsys)
    assert "is not valid JSON" in err and "truncated" in err and "instances.json" in err
    assert not (tmp_path / "o").exists()


def test_missing_image_file(coco_like, tmp_path, capsys):
    name, root = coco_like
    first = json.loads((root / "instances.json").read_text())["images"][0]["file_name"]
    os.remove(root / "images" / first)
    err = cli_error(data_argv(name, tmp_path / "o"), capsys)
    assert "missing under the image directory" in err and first in err
    assert not (tmp_path / "o").exists()


def test_categories_not_matching_num_classes(tmp_path, capsys):
    err = cli_error(["--config-file", CONFIG, *TINY, "MODEL.ROI_HEADS.NUM_CLASSES", "80",
                     "OUTPUT_DIR", str(tmp_path / "o")], capsys)
    assert "has 3 categories" in err and "MODEL.ROI_HEADS.NUM_CLASSES is 80" in err


def test_eval_only_checks_only_the_test_sets(gn_run, tmp_path, capsys):
    """A missing training set does not block evaluation; a missing test set does, and names
    DETECTRON2_DATASETS - both before anything is written."""
    args = argv_args(["--eval-only", "--config-file", CONFIG, *TINY,
                      "DATASETS.TRAIN", "('coco_2017_train',)",
                      "MODEL.WEIGHTS", str(gn_run / "model_final.pth")])
    preflight(args, 1)
    err = cli_error(["--eval-only", "--config-file", CONFIG, *TINY,
                     "DATASETS.TEST", "('coco_2017_val',)",
                     "MODEL.WEIGHTS", str(gn_run / "model_final.pth"),
                     "OUTPUT_DIR", str(tmp_path / "o")], capsys)
    assert "DETECTRON2_DATASETS" in err and "coco_2017_val" in err
    assert not (tmp_path / "o").exists()


@pytest.mark.slow
def test_train_net_script_reports_missing_dataset_root_before_starting_workers(tmp_path):
    """The real script with two processes: one clear message, exit code 2, nothing written."""
    env = dict(os.environ, DETECTRON2_DATASETS=str(tmp_path / "no_datasets"),
               OMP_NUM_THREADS="1")
    out = subprocess.run(
        [sys.executable, os.path.join(REPO, "tools", "train_net.py"), "--num-gpus", "2",
         "--config-file", CONFIG, *TINY, "SOLVER.IMS_PER_BATCH", "4",
         "DATASETS.TRAIN", "('coco_2017_train',)", "OUTPUT_DIR", str(tmp_path / "o")],
        capture_output=True, text=True, timeout=600, env=env, cwd=REPO)
    assert out.returncode == 2, out.stderr[-3000:]
    assert "ERROR (InputProblemsError)" in out.stderr and "DatasetError:" in out.stderr
    assert str(tmp_path / "no_datasets") in out.stderr and "DETECTRON2_DATASETS" in out.stderr
    assert "Traceback" not in out.stderr and "Rank of current process" not in out.stdout
    assert not (tmp_path / "o").exists()


def test_flags_after_the_config_overrides_are_not_merged_into_the_config():
    """detectron2's CLI would take '--eval-only' after KEY VALUE pairs as a config override."""
    args = argv_args(["--config-file", CONFIG, "MODEL.WEIGHTS", "w.pth", "--eval-only",
                      "SOLVER.BASE_LR", "-1", "--num-gpus", "2"])
    assert args.eval_only and args.num_gpus == 2
    assert args.opts == ["MODEL.WEIGHTS", "w.pth", "SOLVER.BASE_LR", "-1"]


def test_parser_takes_every_detectron2_flag_with_detectron2s_meaning():
    """argument_parser is detectron2's default_argument_parser (as `parents`) plus two flags: a
    command line written for detectron2's tools parses to the same values here."""
    from detectron2.engine import default_argument_parser

    from d2_norms.engine.defaults import argument_parser

    stock, ours = default_argument_parser(), argument_parser()
    stock_flags = {s for a in stock._actions for s in a.option_strings}
    ours_flags = {s for a in ours._actions for s in a.option_strings}
    assert ours_flags - stock_flags == {"--allow-partial-weights", "--allow-norm-mismatch"}
    assert stock_flags <= ours_flags
    argv = ["--config-file", CONFIG, "--resume", "--eval-only", "--num-gpus", "2",
            "--num-machines", "1", "--machine-rank", "0", "--dist-url", "tcp://127.0.0.1:1234",
            "SOLVER.BASE_LR", "0.1"]
    want, got = vars(stock.parse_args(argv)), vars(ours.parse_args(argv))
    assert {k: got[k] for k in want} == want
    assert got["allow_partial_weights"] is False and got["allow_norm_mismatch"] is False


def test_divergence_remedies_name_the_input_scale_for_nf():
    from d2_norms.engine.errors import divergence_remedies

    args = type("A", (), {"config_file": CONFIG, "opts": TINY + [
        "MODEL.BACKBONE.NAME", "build_d2n_resnet_fpn_backbone", "MODEL.RESNETS.NORM", "NF",
        "MODEL.PIXEL_STD", "[1.0, 1.0, 1.0]"]})
    text = divergence_remedies(setup_cfg(args, log=False))
    assert "MODEL.PIXEL_STD (now [1.0, 1.0, 1.0])" in text and "~58x too large" in text
    args.opts = TINY  # GN: not mentioned
    assert "PIXEL_STD" not in divergence_remedies(setup_cfg(args, log=False))


def test_input_problems_travel_to_other_ranks_unchanged():
    """launch.run_on_main_process pickles rank 0's error for the other ranks."""
    import pickle

    from d2_norms.engine.errors import InputProblemsError

    error = InputProblemsError(["MODEL.FPN.NORM='X': unknown", "DatasetError: no root"], "a.yaml")
    again = pickle.loads(pickle.dumps(error))
    assert type(again) is InputProblemsError and str(again) == str(error)
    assert again.problems == error.problems and "2 problems in a.yaml" in str(again)
