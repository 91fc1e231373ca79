"""torchrun support: tools/train_net.py started by ``python -m torch.distributed.run`` joins the
launcher's process group (gloo on CPU here) instead of starting independent jobs, and trains the
same model as ``--num-gpus``.

Fast tests: the launcher-environment parsing, the flag checks and WORLD_SIZE=1 in-process. Slow
tests: real torchrun processes (a small probe script, bad input, a short training compared with
``--num-gpus 2``)."""
import json
import os
import sys
import textwrap

import pytest
import torch
import torch.distributed as dist

from d2_norms.engine.launch import (LAUNCHER_VARIABLES, DistributedSetupError,
                                    check_launch_flags, launch, launcher_environment,
                                    run_on_main_process)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN_NET = os.path.join(REPO, "tools", "train_net.py")
CONFIG = os.path.join(REPO, "configs", "synthetic", "mask_rcnn_R18_FPN_GN.yaml")
TRAIN_SET, VAL_SET = "synthetic_shapes_tiny_train", "synthetic_shapes_tiny_val"
# Two processes x 2 images, 4 iterations; SEED fixed so that both launchers draw the same model
# initialisation and data order (with SEED < 0 each run draws a fresh random data seed).
TINY = ["DATASETS.TRAIN", f"('{TRAIN_SET}',)", "DATASETS.TEST", f"('{VAL_SET}',)",
        "DATALOADER.NUM_WORKERS", "0", "SOLVER.IMS_PER_BATCH", "4", "SOLVER.BASE_LR", "0.01",
        "SOLVER.WARMUP_ITERS", "2", "SOLVER.STEPS", "()", "INPUT.MIN_SIZE_TRAIN", "(64,)",
        "INPUT.MAX_SIZE_TRAIN", "64", "INPUT.MIN_SIZE_TEST", "64", "INPUT.MAX_SIZE_TEST", "64",
        "TEST.DETECTIONS_PER_IMAGE", "20", "MODEL.RPN.POST_NMS_TOPK_TEST", "100",
        "SOLVER.MAX_ITER", "4", "SEED", "7",
        # after 4 iterations no score passes the default 0.05: keep them all, so that the
        # evaluation has detections to gather and compare
        "MODEL.ROI_HEADS.SCORE_THRESH_TEST", "0.0"]

TORCHRUN_2 = {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2",
              "GROUP_RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500",
              "TORCHELASTIC_RUN_ID": "none"}


@pytest.fixture
def no_launcher_env(monkeypatch):
    """The test process may itself run under a launcher (CI): start from a clean slate."""
    for name in LAUNCHER_VARIABLES + ("MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID"):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


# ------------------------------------------------------------------------------ env detection
def test_no_launcher_variables_means_no_launcher():
    assert launcher_environment({}) is None
    assert launcher_environment({"MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "1234"}) is None


def test_torchrun_environment_is_read():
    env = launcher_environment(TORCHRUN_2)
    assert (env.rank, env.world_size, env.local_rank, env.local_world_size) == (1, 2, 1, 2)
    assert (env.machine_rank, env.num_machines, env.launcher) == (0, 1, "torchrun")
    assert env.dist_url == "tcp://127.0.0.1:29500"
    # Two machines x 4: rank 6 is local rank 2 on machine 1 (GROUP_RANK derived when absent).
    two_nodes = dict(TORCHRUN_2, RANK="6", WORLD_SIZE="8", LOCAL_RANK="2",
                     LOCAL_WORLD_SIZE="4")
    del two_nodes["GROUP_RANK"], two_nodes["TORCHELASTIC_RUN_ID"]
    env = launcher_environment(two_nodes)
    assert (env.machine_rank, env.num_machines, env.launcher) == (1, 2, "environment")


def test_world_size_one_needs_no_rendezvous():
    env = launcher_environment({"RANK": "0", "WORLD_SIZE": "1"})
    assert (env.world_size, env.local_rank, env.local_world_size) == (1, 0, 1)
    assert env.master_addr is None


@pytest.mark.parametrize("change, expected", [
    ({"WORLD_SIZE": None}, "RANK, LOCAL_RANK, LOCAL_WORLD_SIZE, GROUP_RANK are set but "
                           "WORLD_SIZE is not"),
    ({"RANK": None}, "but RANK is not"),
    ({"LOCAL_WORLD_SIZE": None}, "but LOCAL_WORLD_SIZE is not"),
    ({"RANK": "one"}, "RANK='one' in the environment is not an integer"),
    ({"RANK": "2"}, "RANK must be in [0, WORLD_SIZE)"),
    ({"LOCAL_RANK": "2"}, "LOCAL_RANK must be in [0, LOCAL_WORLD_SIZE)"),
    ({"WORLD_SIZE": "3", "RANK": "1"}, "WORLD_SIZE=3 is not a multiple of LOCAL_WORLD_SIZE=2"),
    ({"LOCAL_RANK": "0"}, "RANK=1 is not machine_rank * LOCAL_WORLD_SIZE + LOCAL_RANK"),
    ({"GROUP_RANK": "1"}, "GROUP_RANK=1 does not match RANK // LOCAL_WORLD_SIZE = 0"),
    ({"MASTER_PORT": None}, "MASTER_PORT not set"),
    ({"MASTER_ADDR": None, "MASTER_PORT": None}, "MASTER_ADDR and MASTER_PORT not set"),
    ({"MASTER_PORT": "http"}, "MASTER_PORT='http' is not a TCP port number"),
])
def test_inconsistent_launcher_environment_is_refused(change, expected):
    env = dict(TORCHRUN_2)
    for name, value in change.items():
        if value is None:
            del env[name]
        else:
            env[name] = value
    with pytest.raises(DistributedSetupError) as info:
        launcher_environment(env)
    assert expected in str(info.value)


def test_rank_alone_is_refused_with_what_to_do():
    with pytest.raises(DistributedSetupError) as info:
        launcher_environment({"RANK": "0"})
    message = str(info.value)
    assert "RANK is set but WORLD_SIZE is not" in message
    assert "torchrun sets" in message and "--num-gpus" in message


# -------------------------------------------------------------------------------- flag checks
def test_flags_that_agree_with_the_launcher_are_accepted():
    env = launcher_environment(TORCHRUN_2)
    check_launch_flags(env)  # nothing given
    check_launch_flags(env, num_gpus_per_machine=2, num_machines=1, machine_rank=0,
                       dist_url="tcp://127.0.0.1:29500")


@pytest.mark.parametrize("flags, expected", [
    ({"num_gpus_per_machine": 4}, "--num-gpus 4, but the launcher started LOCAL_WORLD_SIZE=2"),
    ({"num_gpus_per_machine": 1}, "--num-gpus 1, but the launcher started LOCAL_WORLD_SIZE=2"),
    ({"num_machines": 2}, "--num-machines 2, but the launcher's WORLD_SIZE=2"),
    ({"machine_rank": 1}, "--machine-rank 1, but the launcher made this machine number 0"),
    ({"dist_url": "auto"}, "--dist-url auto, but the launcher's rendezvous is "
                           "MASTER_ADDR:MASTER_PORT (127.0.0.1:29500)"),
    ({"dist_url": "tcp://127.0.0.1:1234"}, "--dist-url tcp://127.0.0.1:1234"),
])
def test_flags_that_contradict_the_launcher_are_refused(flags, expected):
    with pytest.raises(DistributedSetupError) as info:
        check_launch_flags(launcher_environment(TORCHRUN_2), **flags)
    assert expected in str(info.value) and "the launcher decides" in str(info.value)


def test_parser_leaves_process_flags_to_the_launcher():
    from d2_norms.engine.defaults import argument_parser

    args = argument_parser().parse_args(["--config-file", CONFIG])
    assert (args.num_gpus, args.num_machines, args.machine_rank, args.dist_url) == (None,) * 4
    args = argument_parser().parse_args(["--config-file", CONFIG, "--num-gpus", "2"])
    assert args.num_gpus == 2


# ------------------------------------------------------------------- launch, in this process
def _probe():
    return {"initialized": dist.is_initialized(), "world_size": dist.get_world_size()
            if dist.is_initialized() else 1, "pid": os.getpid()}


def test_world_size_one_under_a_launcher_runs_here_as_a_single_process(no_launcher_env):
    for name, value in {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0",
                        "LOCAL_WORLD_SIZE": "1", "GROUP_RANK": "0", "TORCHELASTIC_RUN_ID": "x",
                        "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}.items():
        no_launcher_env.setenv(name, value)
    out = launch(_probe)
    assert out == {"initialized": False, "world_size": 1, "pid": os.getpid()}
    assert launch(_probe, 1) == out  # --num-gpus 1 agrees with LOCAL_WORLD_SIZE=1
    with pytest.raises(DistributedSetupError, match="--num-gpus 2, but the launcher started"):
        launch(_probe, 2)


def test_without_a_launcher_none_means_one_local_process(no_launcher_env):
    assert launch(_probe) == {"initialized": False, "world_size": 1, "pid": os.getpid()}
    assert run_on_main_process(lambda x: x + 1, 1) == 2
    with pytest.raises(DistributedSetupError, match="--dist-url auto .* only works on one"):
        launch(_probe, 1, num_machines=2, machine_rank=0)


def test_cli_refuses_contradicting_flags_with_exit_code_2(no_launcher_env, tmp_path, capsys):
    from d2_norms.engine.defaults import run_cli

    for name, value in TORCHRUN_2.items():
        no_launcher_env.setenv(name, value)
    with pytest.raises(SystemExit) as info:
        run_cli(["--config-file", CONFIG, "--dist-url", "tcp://10.0.0.1:23456",
                 "OUTPUT_DIR", str(tmp_path / "o")])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "ERROR (DistributedSetupError): --dist-url tcp://10.0.0.1:23456" in err
    assert not (tmp_path / "o").exists()


def test_cli_refuses_a_partial_launcher_environment_with_exit_code_2(no_launcher_env,
                                                                     tmp_path, capsys):
    from d2_norms.engine.defaults import run_cli

    no_launcher_env.setenv("RANK", "0")
    with pytest.raises(SystemExit) as info:
        run_cli(["--config-file", CONFIG, "OUTPUT_DIR", str(tmp_path / "o")])
    assert info.value.code == 2
    assert "RANK is set but WORLD_SIZE is not" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


# ------------------------------------------------------------------------ real torchrun runs
def _clean_env(**extra):
    env = {k: v for k, v in os.environ.items()
           if k not in LAUNCHER_VARIABLES + ("MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID")}
    env.update(OMP_NUM_THREADS="2", **extra)
    return env


@pytest.fixture(scope="module")
def torchrun(run_command, free_port):
    """``torchrun(nproc, *args, timeout=300, expect=None)``: ``python -m torch.distributed.run``
    on a free port, launcher variables of this process removed; exit status ``expect`` (None:
    not checked)."""
    def run(nproc, *args, timeout=300, expect=None):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
               "--master_port", str(free_port()), *args]
        return run_command(cmd, env=_clean_env(), expect=expect, timeout=timeout)
    return run


PROBE = textwrap.dedent("""
    import json, os, sys
    import torch
    import torch.distributed as dist
    from detectron2.utils import comm
    from d2_norms.engine.launch import launch, run_on_main_process

    def fail_on_rank0():
        raise FileNotFoundError("only rank 0 looked")

    def main(out_dir):
        record = {"rank": comm.get_rank(), "world_size": comm.get_world_size(),
                  "local_rank": comm.get_local_rank() if dist.is_initialized() else 0,
                  "local_size": comm.get_local_size() if dist.is_initialized() else 1,
                  "backend": dist.get_backend() if dist.is_initialized() else None,
                  "threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
                  "ranks_seen": comm.all_gather(comm.get_rank())}
        record["main_only"] = run_on_main_process(lambda: comm.get_rank())
        try:
            run_on_main_process(fail_on_rank0)
        except FileNotFoundError as e:
            record["shared_error"] = str(e)
        with open(os.path.join(out_dir, f"rank{record['rank']}.json"), "w") as f:
            json.dump(record, f)

    launch(main, args=(sys.argv[1],))
""")


@pytest.mark.slow
def test_torchrun_processes_join_one_group(tmp_path, torchrun):
    script = tmp_path / "probe.py"
    script.write_text(PROBE)
    for nproc in (2, 1):
        out_dir = tmp_path / f"n{nproc}"
        out_dir.mkdir()
        out = torchrun(nproc, str(script), str(out_dir), timeout=180)
        assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]
        records = [json.loads((out_dir / f"rank{r}.json").read_text()) for r in range(nproc)]
        for rank, record in enumerate(records):
            assert record["rank"] == record["local_rank"] == rank
            assert record["world_size"] == record["local_size"] == nproc
            assert record["ranks_seen"] == list(range(nproc))
            assert record["main_only"] == (0 if rank == 0 else None)
            assert record["shared_error"] == "only rank 0 looked"
        if nproc == 2:  # CPU: gloo, cores shared between the local processes as --num-gpus does
            assert {r["backend"] for r in records} == {"gloo"}
            assert {r["threads"] for r in records} == {max(1, records[0]["cpu_count"] // 2)}
        else:  # WORLD_SIZE=1: a plain process, no process group
            assert records[0]["backend"] is None


@pytest.mark.slow
def test_torchrun_with_contradicting_num_gpus_exits_2_before_writing(tmp_path, torchrun):
    out = torchrun(2, TRAIN_NET, "--num-gpus", "4", "--config-file", CONFIG, *TINY,
                   "OUTPUT_DIR", str(tmp_path / "o"), timeout=180)
    assert out.returncode != 0
    assert "ERROR (DistributedSetupError): --num-gpus 4, but the launcher started " \
           "LOCAL_WORLD_SIZE=2" in out.stderr
    assert "exitcode  : 2" in out.stderr  # torchrun's report of the worker; torchrun exits 1
    assert not (tmp_path / "o").exists()


@pytest.mark.slow
def test_torchrun_bad_input_found_on_rank0_stops_every_rank_before_writing(tmp_path, torchrun):
    """The input checks run once (rank 0) after the group is joined; the error reaches every
    rank, each exits 2 with the message, nothing is written."""
    out = torchrun(2, TRAIN_NET, "--config-file", CONFIG, *TINY, "MODEL.RESNETS.NORM",
                   "GroupNorm", "OUTPUT_DIR", str(tmp_path / "o"), timeout=240)
    assert out.returncode != 0
    assert "ERROR (InputProblemsError): 1 problem in" in out.stderr
    assert "MODEL.RESNETS.NORM='GroupNorm': unknown normalizer name" in out.stderr
    assert "exitcode  : 2" in out.stderr
    ours = [line for line in out.stderr.splitlines() if line.strip().startswith("File ")
            and (TRAIN_NET in line or os.path.join(REPO, "d2_norms") in line)]
    assert not ours, ours  # no traceback from the workers (torchrun prints its own)
    assert "Rank of current process" not in out.stdout + out.stderr  # training never set up
    assert not (tmp_path / "o").exists()


def _predictions(run_dir):
    with open(run_dir / "inference" / "coco_instances_results.json") as f:
        return json.load(f)


def _evaluation(run_dir):
    """results.json's metrics, as text (NaN == NaN there, unlike floats)."""
    results = json.loads((run_dir / "results.json").read_text())["evaluations"][VAL_SET]
    return json.dumps(results["metrics"], sort_keys=True), results["iteration"]


def _fingerprints(log_path):
    """The replica check's sha256 prefix(es) in a log file."""
    import re

    return re.findall(r"All 2 replicas hold identical weights \(sha256 (\w+)\)",
                      open(log_path).read())


@pytest.fixture(scope="module")
def torchrun_run(tmp_path_factory, torchrun):
    out_dir = tmp_path_factory.mktemp("torchrun")
    torchrun(2, TRAIN_NET, "--config-file", CONFIG, *TINY, "OUTPUT_DIR", str(out_dir), expect=0)
    return out_dir


@pytest.fixture(scope="module")
def num_gpus_run(tmp_path_factory, run_command):
    out_dir = tmp_path_factory.mktemp("num_gpus")
    run_command([sys.executable, TRAIN_NET, "--num-gpus", "2", "--config-file", CONFIG, *TINY,
                 "OUTPUT_DIR", str(out_dir)], env=_clean_env(), timeout=300)
    return out_dir


@pytest.mark.slow
def test_torchrun_trains_one_job_of_two_processes(torchrun_run):
    log0 = (torchrun_run / "log.txt").read_text()
    log1 = (torchrun_run / "log.txt.rank1").read_text()
    assert "Rank of current process: 0. World size: 2" in log0
    assert "Rank of current process: 1. World size: 2" in log1
    # Both ranks ran the replica check and hold the same weights.
    assert _fingerprints(torchrun_run / "log.txt") == _fingerprints(torchrun_run / "log.txt.rank1")
    assert len(_fingerprints(torchrun_run / "log.txt")) == 1
    # One writer (rank 0): each iteration logged once, one finished status, one results file.
    with open(torchrun_run / "metrics.json") as f:
        iters = [json.loads(line)["iteration"] for line in f if "total_loss" in line]
    assert iters == [3]  # detectron2's writers log every 20 iterations and at the end
    assert json.loads((torchrun_run / "run_status.json").read_text())["state"] == "finished"
    results = json.loads((torchrun_run / "results.json").read_text())
    assert results["run"]["world_size"] == 2 and results["run"]["images_per_gpu"] == 2
    assert set(results["evaluations"][VAL_SET]["metrics"]) == {"bbox", "segm"}


@pytest.mark.slow
def test_torchrun_evaluation_is_gathered_from_both_ranks(torchrun_run):
    from detectron2.data import DatasetCatalog

    val_ids = {d["image_id"] for d in DatasetCatalog.get(VAL_SET)}
    predictions = torch.load(torchrun_run / "inference" / "instances_predictions.pth",
                             weights_only=False)
    # each rank infers half of the set (detectron2's InferenceSampler); rank 0 gathers all
    assert sorted(p["image_id"] for p in predictions) == sorted(val_ids)
    assert len(val_ids) == 8
    assert "Start inference on 4 batches" in (torchrun_run / "log.txt.rank1").read_text()
    detections = _predictions(torchrun_run)
    assert {d["image_id"] for d in detections} == val_ids  # detections of every image


@pytest.mark.slow
def test_torchrun_eval_only_reproduces_the_final_evaluation(torchrun_run, tmp_path, torchrun):
    torchrun(2, TRAIN_NET, "--config-file", CONFIG, *TINY, "--eval-only",
             "MODEL.WEIGHTS", str(torchrun_run / "model_final.pth"),
             "OUTPUT_DIR", str(tmp_path), timeout=240, expect=0)
    assert _predictions(tmp_path) == _predictions(torchrun_run)
    assert _evaluation(tmp_path) == _evaluation(torchrun_run)  # metrics and iteration (4)
    assert _evaluation(tmp_path)[1] == 4


@pytest.mark.slow
def test_torchrun_gives_the_same_model_as_num_gpus(torchrun_run, num_gpus_run):
    """Same seeds, data order (a function of seed, rank and world size), thread counts and
    all-reduce order: bitwise the same weights and losses on CPU."""
    from d2_norms.engine.preflight import load_config
    from d2_norms.engine.replicas import state_fingerprint
    from d2_norms.engine.trainer import Trainer

    a = torch.load(torchrun_run / "model_final.pth", weights_only=False)["model"]
    b = torch.load(num_gpus_run / "model_final.pth", weights_only=False)["model"]
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, different[:5]

    def losses(d):
        with open(d / "metrics.json") as f:
            return [(r["iteration"], r["total_loss"]) for r in map(json.loads, f)
                    if "total_loss" in r]

    assert losses(torchrun_run) == losses(num_gpus_run)
    assert _predictions(torchrun_run) == _predictions(num_gpus_run)
    assert _evaluation(torchrun_run) == _evaluation(num_gpus_run)
    # The fingerprint both ranks logged is that of the saved weights (built independently here).
    cfg = load_config(str(torchrun_run / "config.yaml"), [])
    model = Trainer.build_model(cfg)
    model.load_state_dict(a)
    logged = _fingerprints(torchrun_run / "log.txt")[0]
    assert state_fingerprint(model).startswith(logged)
    assert _fingerprints(num_gpus_run / "log.txt") == [logged]
