"""Signatures of the models the shipped yacs configs build: parameter names and shapes, and
outputs of every component given weights derived from the parameter names.

``D2_NORMS_FRN_IMPL=eager python tests/model_signatures.py --write`` (re)captures ``tests/fixtures/model_signatures.json.gz``;
``tests/test_model_signatures.py`` rebuilds every config and compares. The fixture was captured
before issue 11 phase 2 replaced the surgery on stock heads by registered components, so it
pins the models of that time: the same parameter names / shapes and the same outputs.

Weights: every state-dict entry is filled from a generator seeded with the CRC32 of its name
(matrices ~ N(0, 1/fan_in), 1-d "weight" 1 + N(0, 0.1^2), running_var U(0.5, 1.5), other 1-d
N(0, 0.1^2)), so two models with the same names and shapes get the same weights. Outputs are
computed in eval mode on a fixed image: backbone features; RetinaNet head logits and box
deltas; RPN objectness / deltas; box head and box predictor, mask head on fixed boxes. Each
output is recorded as shape, mean, std and 32 evenly spaced values.
"""
import argparse
import glob
import gzip
import hashlib
import json
import os
import sys
import zlib

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURE = os.path.join(ROOT, "tests", "fixtures", "model_signatures.json.gz")
CONFIG_GLOBS = ("configs/synthetic/*.yaml", "configs/COCO-scratch/*.yaml",
                "configs/COCO-finetune/*.yaml")
IMAGE_SIZE = 96
NUM_SAMPLES = 32


def shipped_configs():
    out = []
    for pattern in CONFIG_GLOBS:
        for path in sorted(glob.glob(os.path.join(ROOT, pattern))):
            if os.path.basename(path).startswith("Base-"):
                continue
            out.append(os.path.relpath(path, ROOT))
    return out


def load_cfg(rel_path):
    from d2_norms.engine.preflight import load_config

    cfg = load_config(os.path.join(ROOT, rel_path), ["MODEL.DEVICE", "cpu", "MODEL.WEIGHTS", ""])
    return cfg


def model_key(cfg) -> str:
    """Configs that differ only outside MODEL (schedule, batch, data) build the same model."""
    model = cfg.MODEL.clone()
    model.defrost()
    model.WEIGHTS = ""
    # MODEL.D2NORMS.NORM (issue 20) selects the per-part keys, which decide the model
    model.D2NORMS.pop("NORM", None)
    # Which registered component builds a part is what issue 11 changes, not the model.
    for node, key in ((model, "META_ARCHITECTURE"), (model.RPN, "HEAD_NAME"),
                      (model.ROI_BOX_HEAD, "NAME"), (model.ROI_MASK_HEAD, "NAME")):
        setattr(node, key, "")
    return hashlib.sha256(model.dump().encode()).hexdigest()[:16]


def fill_weights(model):
    state = model.state_dict()
    new = {}
    for name, value in state.items():
        if not torch.is_floating_point(value):
            new[name] = value
            continue
        gen = torch.Generator().manual_seed(zlib.crc32(name.encode()))
        if name.endswith("running_var"):
            t = torch.rand(value.shape, generator=gen) + 0.5
        elif value.dim() > 1:
            fan_in = max(1, value[0].numel())
            t = torch.randn(value.shape, generator=gen) / fan_in ** 0.5
        elif name.endswith("weight") or name.endswith("gain"):
            t = 1 + 0.1 * torch.randn(value.shape, generator=gen)
        else:
            t = 0.1 * torch.randn(value.shape, generator=gen)
        new[name] = t.to(value.dtype)
    model.load_state_dict(new)


def summarize(t: torch.Tensor):
    t = t.detach().double()
    flat = t.flatten()
    idx = torch.linspace(0, flat.numel() - 1, min(NUM_SAMPLES, flat.numel())).long()
    return {"shape": list(t.shape), "mean": flat.mean().item(),
            "std": flat.std().item() if flat.numel() > 1 else 0.0,
            "samples": flat[idx].tolist()}


def outputs(model, cfg):
    from detectron2.structures import Boxes

    gen = torch.Generator().manual_seed(0)
    image = torch.rand(1, 3, IMAGE_SIZE, IMAGE_SIZE, generator=gen) * 255
    x = (image - model.pixel_mean) / model.pixel_std
    out = {}
    with torch.no_grad():
        feats = model.backbone(x)
        for k, v in feats.items():
            out[f"backbone.{k}"] = summarize(v)
        if hasattr(model, "head"):  # RetinaNet
            in_feats = [feats[f] for f in cfg.MODEL.RETINANET.IN_FEATURES]
            logits, deltas = model.head(in_feats)
            for i, (lg, dl) in enumerate(zip(logits, deltas)):
                out[f"head.logits.{i}"] = summarize(lg)
                out[f"head.deltas.{i}"] = summarize(dl)
            return out
        rpn_feats = [feats[f] for f in cfg.MODEL.RPN.IN_FEATURES]
        obj, dl = model.proposal_generator.rpn_head(rpn_feats)
        for i, (o, d) in enumerate(zip(obj, dl)):
            out[f"rpn.objectness.{i}"] = summarize(o)
            out[f"rpn.deltas.{i}"] = summarize(d)
        roi = model.roi_heads
        boxes = [Boxes(torch.tensor([[4.0, 6.0, 60.0, 50.0], [30.0, 20.0, 90.0, 94.0],
                                     [10.0, 40.0, 40.0, 70.0]]))]
        box_in = [feats[f] for f in roi.box_in_features]
        bx = roi.box_head(roi.box_pooler(box_in, boxes))
        out["roi.box_head"] = summarize(bx)
        scores, box_deltas = roi.box_predictor(bx)
        out["roi.box_scores"] = summarize(scores)
        out["roi.box_deltas"] = summarize(box_deltas)
        if getattr(roi, "mask_on", False):
            mask_in = [feats[f] for f in roi.mask_in_features]
            out["roi.mask_head"] = summarize(roi.mask_head.layers(roi.mask_pooler(mask_in, boxes)))
    return out


def signature(cfg):
    from detectron2.modeling import build_model

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # reductions in one fixed order: outputs do not depend on cores
    try:
        torch.manual_seed(0)
        model = build_model(cfg)
        model.eval()
        params = [[n, list(p.shape)] for n, p in model.state_dict().items()]
        fill_weights(model)
        return {"state_dict": params, "outputs": outputs(model, cfg)}
    finally:
        torch.set_num_threads(threads)


def capture(configs):
    import d2_norms  # noqa: F401

    models, config_keys = {}, {}
    for rel in configs:
        cfg = load_cfg(rel)
        key = model_key(cfg)
        config_keys[rel] = key
        if key not in models:
            print(f"{rel} -> {key}", flush=True)
            models[key] = signature(cfg)
    return {"configs": config_keys, "models": models}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--write", action="store_true", help=f"write {FIXTURE}")
    args = parser.parse_args(argv)
    data = capture(shipped_configs())
    print(f"{len(data['configs'])} configs, {len(data['models'])} distinct models")
    if args.write:
        tmp = FIXTURE + ".tmp"
        with gzip.open(tmp, "wt", compresslevel=9) as f:
            json.dump(data, f, sort_keys=True)
        os.replace(tmp, FIXTURE)
        print("wrote", FIXTURE)
    return 0


if __name__ == "__main__":
    sys.exit(main())


def load_fixture():
    with gzip.open(FIXTURE, "rt") as f:
        return json.load(f)


def assert_same_outputs(model, reference, cfg):
    """Both models with the same name-seeded weights, in eval mode, give bitwise the same
    outputs of every component (:func:`outputs`, on one thread: same ops, same order)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for m in (model, reference):
            fill_weights(m)
            m.eval()
        got, want = outputs(model, cfg), outputs(reference, cfg)
    finally:
        torch.set_num_threads(threads)
    assert sorted(got) == sorted(want)
    for name in want:
        assert got[name] == want[name], name
