"""tools/gpu_check.py: argument checks (CUDA refused clearly when absent), its float64 FRN
reference against timm's FRN layer, a failed run reported (not raised), and - slow - a real
2-iteration CPU run through d2_norms' trainer whose recorded losses match what detectron2's
JSONWriter logged, plus the compiled-vs-eager FRN comparison on CPU."""
import json
import math

import numpy as np
import pytest
import torch

TINY = ["--train-set", "synthetic_shapes_tiny_train", "--test-set", "synthetic_shapes_tiny_val"]


@pytest.fixture(scope="module")
def gpu_check(load_tool):
    return load_tool("gpu_check")


def parse_error(gpu_check, capsys, argv):
    with pytest.raises(SystemExit) as exc:
        gpu_check.parse_args(argv)
    assert exc.value.code == 2
    return capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
def test_cuda_is_the_default_and_refused_clearly_without_it(gpu_check, capsys):
    err = parse_error(gpu_check, capsys, [])
    assert "CUDA is not available" in err and "--device cpu" in err


@pytest.mark.parametrize("argv, expected", [
    (["--device", "cpu", "--amp", "on"], "--amp on needs CUDA"),
    (["--device", "cpu", "--amp", "both"], "--amp both needs CUDA"),
    (["--device", "cpu", "--iters", "0"], "--iters must be >= 1"),
    (["--device", "cpu", "--ims", "0"], "--ims must be >= 1"),
    (["--device", "cpu", "--norms", "LN"], "invalid choice: 'LN'"),
])
def test_bad_arguments_say_what_is_wrong(gpu_check, capsys, argv, expected):
    assert expected in parse_error(gpu_check, capsys, argv)


def test_defaults_cover_every_normalizer_and_detector(gpu_check):
    args = gpu_check.parse_args(["--device", "cpu"])
    assert args.norms == ["BN", "GN", "GNWS", "FRN", "NF"]
    assert args.detectors == ["mask_rcnn", "retinanet"]
    assert args.amp == "off" and gpu_check.amp_modes(args) == [False]
    assert gpu_check.amp_modes(gpu_check.parse_args(["--device", "cpu", "--amp", "off"])) == [
        False]


def test_float64_reference_matches_timm_frn(gpu_check):
    timm_layers = pytest.importorskip("timm.layers")
    torch.manual_seed(0)
    layer = timm_layers.FilterResponseNormTlu2d(8, eps=1e-6).double()
    with torch.no_grad():
        layer.weight.uniform_(0.5, 1.5)
        layer.bias.uniform_(-0.3, 0.3)
        layer.tau.uniform_(-0.3, 0.3)
    x = torch.randn(3, 8, 5, 7, dtype=torch.float64)
    ours = gpu_check.frn_float64(x, layer.weight, layer.bias, layer.tau,
                                 torch.tensor(1e-6, dtype=torch.float64))
    # timm takes the mean of x^2 in float32 even for float64 inputs: agreement to ~1e-7.
    torch.testing.assert_close(ours, layer(x), rtol=1e-5, atol=1e-6)


def test_a_failing_run_is_reported_and_the_exit_status_is_1(gpu_check, tmp_path, capsys):
    out = tmp_path / "check.json"
    status = gpu_check.main(["--device", "cpu", "--norms", "BN", "--detectors", "retinanet",
                             "--skip-frn-kernels", "--export-norm", "none",
                             "--train-set", "no_such_dataset", "--json", str(out)])
    assert status == 1
    data = json.loads(out.read_text())
    assert data["passed"] is False and data["export"] == []
    (record,) = data["training"]
    assert record["ok"] is False and "no_such_dataset" in record["error"]
    assert "1 CHECK(S) FAILED" in capsys.readouterr().out


@pytest.mark.slow
def test_cpu_run_through_the_trainer_records_what_detectron2_logs(gpu_check, tmp_path):
    """Also exports the trained model with tools/export_model.py (the --export-norm step)."""
    runs, out = tmp_path / "runs", tmp_path / "check.json"
    status = gpu_check.main(["--device", "cpu", "--iters", "2", "--ims", "2", "--norms", "GN",
                             "--detectors", "mask_rcnn", "--eval-norm", "none", "--workers", "0",
                             "--skip-frn-kernels", "--export-norm", "GN", *TINY,
                             "--output-dir", str(runs), "--keep-outputs", "--json", str(out)])
    assert status == 0
    data = json.loads(out.read_text())
    assert data["passed"] is True and data["frn_kernels"] == []
    (record,) = data["training"]
    assert record["ok"] and record["final_checkpoint"] and not record["amp"]
    assert len(record["step_seconds"]) == 2 and record["s_per_it"] > 0
    assert len(record["total_losses"]) == 2
    assert all(math.isfinite(v) for v in record["total_losses"])
    # detectron2's JSONWriter logged the same losses (median over its 20-iteration window).
    run_dir = runs / "mask_rcnn_GN_fp32"
    with open(run_dir / "metrics.json") as f:
        logged = [json.loads(line) for line in f if line.strip()]
    last = next(r for r in logged if r.get("iteration") == 1)
    assert last["total_loss"] == pytest.approx(float(np.median(record["total_losses"])),
                                               rel=1e-6)
    assert (run_dir / "model_final.pth").is_file()
    (export,) = data["export"]
    assert export["ok"] and export["exit_status"] == 0, export.get("error")
    assert export["weights"] == str(run_dir / "model_final.pth") == record["weights"]
    assert set(export["max_abs_diff"]) == {"pred_boxes", "scores", "pred_classes", "pred_masks"}
    assert max(export["max_abs_diff"].values()) <= export["atol"]


@pytest.mark.slow
def test_compiled_frn_kernels_match_eager_and_float64_on_cpu(gpu_check, monkeypatch):
    from d2_norms.layers import frn as frn_module

    if not frn_module.frn_compiled_available():
        pytest.skip(f"torch.compile unavailable: {frn_module._COMPILED.broken}")
    cases = [c for c in gpu_check.FRN_CASES if c[2] == "float32"][::3]  # short rows; 1x1 maps
    monkeypatch.setattr(gpu_check, "FRN_CASES", cases)
    records = gpu_check.check_frn_kernels(torch.device("cpu"))
    assert [r["case"] for r in records[:-1]] == [c[0] for c in cases]
    for r in records[:-1]:
        assert r["ok"], r.get("error")
        assert set(r["diffs"]) >= {"out", "grad_x", "grad_weight", "grad_bias", "grad_tau"}
        assert r["max_compiled_vs_eager_rel"] <= r["tolerance_rel"]
    assert "grad_eps_l" in records[1]["diffs"]
    assert records[-1]["cache_sizes"]  # the compiled kernels really ran


def test_time_budget_skips_the_remaining_runs_and_still_reports(gpu_check, tmp_path, capsys):
    out = tmp_path / "check.json"
    status = gpu_check.main(["--device", "cpu", "--norms", "GN", "FRN", "--skip-frn-kernels",
                             "--time-budget", "0", *TINY, "--json", str(out)])
    assert status == 0
    data = json.loads(out.read_text())
    runs = [(r["detector"], r["norm"], r["ok"]) for r in data["training"]]
    assert runs == [("mask_rcnn", "GN", None), ("mask_rcnn", "FRN", None),
                    ("retinanet", "GN", None), ("retinanet", "FRN", None)]
    assert all("--time-budget 0 s used up" in r["skipped"] for r in data["training"])
    assert data["export"][0]["ok"] is None and data["passed"] is True
    assert "ALL CHECKS PASSED, 5 skipped (time budget)" in capsys.readouterr().out


def test_timings_default_off_on_cpu_and_on_with_cuda(gpu_check):
    args = gpu_check.parse_args(["--device", "cpu"])
    assert args.layers == "off" and args.models == "off" and args.model_amp == ["off"]
    args = gpu_check.parse_args(["--device", "cpu", "--layers", "on", "--models", "on",
                                 "--model-ims", "1", "2"])
    assert args.layers == "on" and args.models == "on" and args.model_ims == [1, 2]
    assert args.model_size == 800


def test_layer_timings_run_on_cpu(gpu_check, tmp_path, capsys):
    """The layer part of the GPU script on CPU: op counts at the issue's targets, timings."""
    out = tmp_path / "check.json"
    status = gpu_check.main(["--device", "cpu", "--skip-train", "--skip-frn-kernels",
                             "--export-norm", "none", "--layers", "on", "--layer-reps", "1",
                             "--layer-shapes", "2x32x6x6", "--layer-conv-shapes", "1x32x5x5",
                             "--json", str(out)])
    assert status == 0
    data = json.loads(out.read_text())
    (rec,) = data["layers"]
    assert rec["ok"], rec.get("error")
    assert rec["ops"]["GN+ReLU"] == 10 and rec["ops"]["WS conv"] <= 14
    assert rec["ops"]["Scaled WS conv"] <= 16
    names = {(r["kind"], r["dtype"], r["name"]) for r in rec["rows"] if "ms" in r}
    assert ("norm", "fp32", "FRN+TLU eager") in names and ("conv", "bf16", "WS conv") in names
    assert all(r["gbps"] > 0 for r in rec["rows"] if r["kind"] == "norm" and "ms" in r)
    assert "| norm fp32: ms (ratio, GB/s) |" in capsys.readouterr().out


@pytest.mark.slow
def test_model_timings_run_on_cpu(gpu_check, tmp_path):
    """The whole-model part on CPU at a toy size (R18, 256 px: BN at 1 image needs P7 > 1x1)."""
    out = tmp_path / "check.json"
    status = gpu_check.main(["--device", "cpu", "--skip-train", "--skip-frn-kernels",
                             "--export-norm", "none", "--models", "on", "--model-size", "256",
                             "--model-ims", "1", "--model-rounds", "1", "--model-depth", "18",
                             "--json", str(out)])
    assert status == 0
    data = json.loads(out.read_text())
    assert [(r["detector"], r["amp"], r["ok"]) for r in data["models"]] == [
        ("retinanet", "off", True), ("mask_rcnn", "off", True)]
    norms = {r["norm"] for r in data["models"][0]["train"]}
    assert norms == {"BN", "GN", "GNWS", "FRN", "NF"}
