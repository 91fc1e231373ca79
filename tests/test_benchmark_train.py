"""tools/benchmark_train.py in --quick mode: it runs every detector x normalizer, and prints the
side-by-side tables, the ratios against BN and the target lines (structure, not timings)."""
import json
import os
import re
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "tools", "benchmark_train.py")
NORMS = ["BN", "GN", "GNWS", "FRN", "NF"]
INFERENCE_MODELS = ["BN", "FrozenBN", "GN", "GNWS", "GNWS folded", "FRN", "NF", "NF folded"]


def table_rows(text, header_start):
    """Rows (lists of cells) of the markdown table whose header starts with header_start."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(header_start))
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        rows.append([c.strip() for c in line.strip("|").split("|")])
    return rows


@pytest.mark.slow
def test_quick_mode_prints_every_table_and_ratio(tmp_path):
    out_json = tmp_path / "bench.json"
    out = subprocess.run([sys.executable, SCRIPT, "--quick", "--json", str(out_json)],
                         capture_output=True, text=True, timeout=900, cwd=REPO,
                         env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert out.returncode == 0, out.stderr[-4000:]
    text = out.stdout
    for key in ("- device: CPU", "- torch:", "- detectron2:", "- frn_impl:", "- load_average:"):
        assert key in text
    sections = re.split(r"^### ", text, flags=re.M)
    titles = [s.splitlines()[0] for s in sections[1:]]
    assert titles[:2] == ["RetinaNet R18-FPN, 128x128 px, CPU (1 thread)",
                          "Mask R-CNN R18-FPN, 128x128 px, CPU (1 thread)"]
    for section in sections[1:3]:
        train = table_rows(section, "| img/GPU | norm | step ms")
        assert [r[1] for r in train] == NORMS and {r[0] for r in train} == {"2"}
        for row in train:
            step, step_x, mem, mem_x = map(float, row[2:6])
            assert step > 0 and mem > 0
        bn = train[0]
        assert bn[3] == "1.000" and bn[5] == "1.000"  # ratios are against BN
        for row in train[1:]:  # ratio columns are the quotients of the value columns
            assert float(row[3]) == pytest.approx(float(row[2]) / float(bn[2]), abs=2e-3)
            assert float(row[5]) == pytest.approx(float(row[4]) / float(bn[4]), abs=2e-3)
        infer = table_rows(section, "| img/GPU | model | ms")
        assert [r[1] for r in infer] == INFERENCE_MODELS
        frozen = next(r for r in infer if r[1] == "FrozenBN")
        assert frozen[4] == "1.000"
        # folding the weight standardization gives the same network
        diffs = re.search(r"max relative difference: NF ([\d.e+-]+), GNWS ([\d.e+-]+)", section)
        assert diffs and float(diffs.group(1)) < 1e-4 and float(diffs.group(2)) < 1e-4
    targets = re.findall(r"^- (.+): (.+) -> (met|NOT met)$", text, flags=re.M)
    labels = [t[0] for t in targets]
    for det in ("RetinaNet", "Mask R-CNN"):
        for norm in ("FRN", "GN", "NF"):
            assert f"{det} {norm} step <= 1.05x BN" in labels
            assert f"{det} {norm} memory <= 1.00x BN" in labels
        assert f"{det} NF folded inference <= 1.00x FrozenBN" in labels
    data = json.loads(out_json.read_text())
    assert [r["detector"] for r in data["results"]] == ["retinanet", "mask_rcnn"]
    assert all(r["memory_bytes"] > 0 for res in data["results"] for r in res["train"])
