"""Every shipped yacs config builds the model it built before issue 11 phase 2 (registered
components instead of surgery on stock ones): same parameter names and shapes, same outputs of
every component given the same weights. Fixture and method: ``tests/model_signatures.py``.

Deliberate changes since the capture, each checked for exactly what it changes:
* issue 13 item 8: NF Mask R-CNN configs set ``MODEL.RPN.NORM: "NF"`` (Scaled WS in every
  conv, NF sec. 4.5): the RPN head's conv gains a ``gain`` and its outputs change.
"""
import pytest
import torch

import model_signatures as ms

FIXTURE = ms.load_fixture()


def _configs_by_model():
    by_model = {}
    for rel, key in sorted(FIXTURE["configs"].items()):
        by_model.setdefault(key, []).append(rel)
    return by_model


BY_MODEL = _configs_by_model()


def test_fixture_covers_every_shipped_config():
    assert sorted(FIXTURE["configs"]) == sorted(ms.shipped_configs())


def test_configs_sharing_a_fixture_model_still_build_one_model():
    # The grouping was made by the old code; configs grouped together must still agree.
    for key, configs in BY_MODEL.items():
        keys = {ms.model_key(ms.load_cfg(rel)) for rel in configs}
        assert len(keys) == 1, (key, configs)


def deliberate_changes(cfg):
    """(parameter names added since the capture, output name prefixes that changed)."""
    if cfg.MODEL.RPN.get("NORM", "") == "NF":
        return {"proposal_generator.rpn_head.conv.gain"}, ("rpn.",)
    return set(), ()


@pytest.mark.parametrize("key", sorted(BY_MODEL), ids=[BY_MODEL[k][0].split("/")[-1]
                                                        for k in sorted(BY_MODEL)])
def test_model_matches_fixture(key):
    rel = BY_MODEL[key][0]
    expected = FIXTURE["models"][key]
    cfg = ms.load_cfg(rel)
    added, changed = deliberate_changes(cfg)
    got = ms.signature(cfg)
    got_names = [name for name, _ in got["state_dict"]]
    assert {n for n in got_names if n not in dict(expected["state_dict"])} == added, rel
    assert [e for e in got["state_dict"] if e[0] not in added] == expected["state_dict"], rel
    assert sorted(got["outputs"]) == sorted(expected["outputs"]), rel
    for name, exp in expected["outputs"].items():
        if name.startswith(changed):
            continue
        out = got["outputs"][name]
        assert out["shape"] == exp["shape"], (rel, name)
        torch.testing.assert_close(
            torch.tensor([out["mean"], out["std"]] + out["samples"], dtype=torch.float64),
            torch.tensor([exp["mean"], exp["std"]] + exp["samples"], dtype=torch.float64),
            rtol=1e-4, atol=1e-5 * max(1.0, exp["std"]), msg=lambda m: f"{rel} {name}: {m}")
