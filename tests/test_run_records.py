"""tools/run_records.py: publish run directories without weights, naming no machine path."""
import json
import os

import d2_norms  # noqa: F401
from detectron2.config import get_cfg

from d2_norms.evaluation import save_results, write_run_status

DATASET = "synthetic_shapes_val"


def make_run(root, name, state="finished", ap=30.0):
    cfg = get_cfg()
    cfg.MODEL.META_ARCHITECTURE = "RetinaNet"
    cfg.MODEL.RESNETS.NORM = cfg.MODEL.FPN.NORM = cfg.MODEL.RETINANET.NORM = "GN"
    cfg.MODEL.RESNETS.DEPTH = 18
    cfg.SOLVER.IMS_PER_BATCH = 2
    cfg.DATASETS.TEST = (DATASET,)
    out = os.path.join(str(root), name)
    cfg.OUTPUT_DIR = out
    os.makedirs(out)
    with open(os.path.join(out, "config.yaml"), "w") as f:
        f.write(cfg.dump())
    with open(os.path.join(out, "metrics.json"), "w") as f:
        f.write(json.dumps({"iteration": 19, "total_loss": 1.0}) + "\n")
    for junk in ("model_final.pth", "log.txt", "events.out.tfevents.1"):
        with open(os.path.join(out, junk), "w") as f:
            f.write(f"{out}\n")
    write_run_status(out, "running", start_iter=0, max_iter=100)
    if state == "finished":
        metrics = {"AP": ap, "AP50": ap + 20, "AP75": ap - 2, "APs": ap, "APm": ap, "APl": ap}
        save_results(out, {"bbox": metrics}, cfg, 99, DATASET)
        write_run_status(out, "finished", iteration=100)
    return out


def test_records_are_copied_without_weights_or_machine_paths(tmp_path, load_tool, capsys):
    tool = load_tool("run_records")
    runs = [make_run(tmp_path / "out", "gn_2img"), make_run(tmp_path / "out", "gn_4img", ap=28.0)]
    dest = tmp_path / "published"
    assert tool.main([*runs, "-o", str(dest)]) == 0
    for run in runs:
        copy = dest / os.path.basename(run)
        assert sorted(os.listdir(copy)) == sorted(tool.RECORD_FILES)  # no weights, logs, events
        for file in tool.RECORD_FILES:
            assert str(tmp_path) not in (copy / file).read_text(), file
        assert (copy / "metrics.json").read_bytes() == open(
            os.path.join(run, "metrics.json"), "rb").read()
    # the copies are run directories: ap_table prints the same table (paths aside)
    ap_table = load_tool("ap_table")
    capsys.readouterr()
    assert ap_table.main([*runs, "--csv"]) == 0
    original = capsys.readouterr().out
    assert ap_table.main([str(dest / "gn_2img"), str(dest / "gn_4img"), "--csv"]) == 0
    copied = capsys.readouterr().out

    def without_runs(csv_text):
        return [line.rsplit(",", 1)[0] for line in csv_text.splitlines()]

    assert without_runs(copied) == without_runs(original) and "30.0" in copied
    # published again (more cells finished): replaced whole, no temporary left
    assert tool.main([runs[0], "-o", str(dest)]) == 0
    assert sorted(os.listdir(dest)) == ["gn_2img", "gn_4img"]


def test_paths_into_the_repository_become_relative(load_tool):
    tool = load_tool("run_records")
    run = os.path.join(tool.REPO, "output", "study", "cell_1img")
    text = f"OUTPUT_DIR: {run}\nWEIGHTS: {os.path.join(tool.REPO, 'pretrained', 'w.pth')}\n"
    assert tool.relative_text(text, run) == (
        "OUTPUT_DIR: output/study/cell_1img\nWEIGHTS: pretrained/w.pth\n")


def test_running_or_unknown_runs_are_refused_and_nothing_is_written(tmp_path, load_tool,
                                                                     capsys):
    tool = load_tool("run_records")
    done = make_run(tmp_path / "out", "done")
    running = make_run(tmp_path / "out", "running", state="running")
    dest = tmp_path / "published"
    for bad, reason in ((running, "still running"), (str(tmp_path), "not a run directory")):
        assert tool.main([done, bad, "-o", str(dest)]) == 2
        err = capsys.readouterr().err
        assert reason in err and "nothing written" in err
        assert not dest.exists()
    broken = make_run(tmp_path / "out", "broken")
    with open(os.path.join(broken, "run_status.json"), "w") as f:
        f.write('{"state": "runnin')  # cut off
    assert tool.main([done, broken, "-o", str(dest)]) == 2
    err = capsys.readouterr().err
    assert "run_status.json" in err and "nothing written" in err and not dest.exists()
    assert tool.main([done, running, "-o", str(dest), "--include-running"]) == 0
    assert sorted(os.listdir(dest)) == ["done", "running"]


def test_a_run_without_metrics_is_copied_with_what_it_has(tmp_path, load_tool):
    tool = load_tool("run_records")
    missing = "metrics.json"
    run = make_run(tmp_path / "out", "cell")
    os.remove(os.path.join(run, missing))
    assert tool.main([run, "-o", str(tmp_path / "dest")]) == 0
    assert missing not in os.listdir(tmp_path / "dest" / "cell")
