#!/usr/bin/env python
"""Convert ImageNet-pretrained timm weights into a d2_norms backbone checkpoint.

    python tools/convert_pretrained.py timm resnet50_gn [--checkpoint FILE] -o OUT.pth [--verify]
    python tools/convert_pretrained.py timm nf_resnet50 [--checkpoint FILE] -o OUT.pth [--verify]

Reads timm's state dict from FILE (a ``.pth`` / ``.bin`` saved by ``torch.save``, or a
``.safetensors`` file; a training checkpoint holding it under ``state_dict`` / ``model`` works
too) or, without ``--checkpoint``, through ``timm.create_model(name, pretrained=True)`` (needs
timm and internet). Checks every name and width, maps the weights onto the d2_norms backbone
that computes timm's function (d2_norms/modeling/pretrained.py), writes OUT atomically and
prints the fine-tuning command. ``--verify`` (needs timm) also compares res2..res5 of the
converted backbone with timm's stage outputs on a random image. See docs/pretrained.md.

Exit codes: 0 written; 1 --verify found a difference; 2 bad input (nothing written).
"""
import argparse
import os
import sys

import d2_norms  # noqa: F401  (shims + registrations before detectron2 builds anything)

EXIT_DIFFERS = 1
EXIT_BAD_INPUT = 2
# float32 outputs of the same function differ by rounding only: measured <= 2e-6 of the
# largest activation on NF-ResNet-50 (docs/pretrained.md); a wrong option gives >= 1e-3.
VERIFY_RTOL = 1e-4


class BadInput(Exception):
    pass


def parse_args(argv=None):
    from d2_norms.modeling.pretrained import supported_timm_models

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="source", required=True, metavar="SOURCE")
    t = sub.add_parser("timm", help="a timm model's weights",
                       description=f"supported models: {', '.join(supported_timm_models())}")
    t.add_argument("model_name", help=f"timm model name ({', '.join(supported_timm_models())})")
    t.add_argument("--checkpoint", default=None,
                   help="timm state dict file (default: download through timm)")
    t.add_argument("-o", "--output", required=True, help="the detectron2 checkpoint to write")
    t.add_argument("--verify", action="store_true",
                   help="compare res2..res5 with timm's stage outputs (needs timm)")
    return parser.parse_args(argv)


def _load_checkpoint(path):
    import torch

    if not os.path.isfile(path):
        raise BadInput(f"--checkpoint {path} does not exist")
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file

            return load_file(path)
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # unreadable / not a torch file: say which and why
        raise BadInput(f"--checkpoint {path} could not be read as a torch state dict "
                       f"({type(e).__name__}: {e})") from e


def _timm_model(name, pretrained):
    try:
        import timm
    except ImportError as e:
        raise BadInput(
            "timm is not installed: pass --checkpoint FILE (a state dict saved from timm), or "
            "install timm to download the weights / to --verify") from e
    return timm.create_model(name, pretrained=pretrained)


def _verify(name, state, checkpoint):
    """Largest |res_k - timm stage k| / max|timm stage k| on a random 2x3x160x128 batch."""
    import torch

    from d2_norms.modeling.pretrained import build_backbone, timm_stage_modules

    model = _timm_model(name, pretrained=False).eval()
    model.load_state_dict(state)
    backbone = build_backbone(name).eval()
    backbone.load_state_dict(checkpoint["model"])
    outputs = {}
    for i, module_name in enumerate(timm_stage_modules(name)):
        model.get_submodule(module_name).register_forward_hook(
            lambda m, a, out, i=i: outputs.__setitem__(i, out))
    x = torch.randn(2, 3, 160, 128, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        model(x)
        features = backbone(x)
    return {f"res{i + 2}": float((features[f"res{i + 2}"] - outputs[i]).abs().max()
                                  / outputs[i].abs().max().clamp_min(1e-12)) for i in range(4)}


def convert(args):
    import torch

    from d2_norms.fileio import atomic_write_bytes
    from d2_norms.modeling.pretrained import (ConversionError, convert_timm_state_dict,
                                              get_timm_spec, unwrap_state_dict)

    try:
        spec = get_timm_spec(args.model_name)
    except ConversionError as e:
        raise BadInput(str(e)) from e
    if os.path.isdir(args.output):
        raise BadInput(f"-o {args.output} is a directory; give the file to write "
                       f"(e.g. {os.path.join(args.output, os.path.basename(spec.default_output))})")
    if args.checkpoint:
        state = unwrap_state_dict(_load_checkpoint(args.checkpoint))
        source = args.checkpoint
    else:
        try:
            state = _timm_model(args.model_name, pretrained=True).state_dict()
        except BadInput:
            raise
        except Exception as e:  # no internet / unknown pretrained tag
            raise BadInput(f"timm could not provide pretrained {args.model_name} "
                           f"({type(e).__name__}: {e}); download the weights elsewhere and "
                           "pass --checkpoint FILE") from e
        source = f"timm.create_model({args.model_name!r}, pretrained=True)"
    try:
        checkpoint = convert_timm_state_dict(args.model_name, state)
    except ConversionError as e:
        raise BadInput(f"{source}: {e}") from e

    if args.verify:
        diffs = _verify(spec.timm_name, state, checkpoint)
        print("verify (max |d2_norms - timm| / max |timm|, float32): "
              + ", ".join(f"{k} {v:.2e}" for k, v in diffs.items()))
        if max(diffs.values()) > VERIFY_RTOL:
            print(f"error: the converted backbone differs from timm's {spec.timm_name} beyond "
                  f"{VERIFY_RTOL:g}; nothing written", file=sys.stderr)
            return EXIT_DIFFERS

    atomic_write_bytes(args.output, lambda f: torch.save(checkpoint, f))
    n = sum(v.numel() for v in checkpoint["model"].values())
    print(f"wrote {args.output}: {len(checkpoint['model'])} tensors, {n / 1e6:.2f}M parameters "
          f"of timm {spec.timm_name} ({spec.description})")
    print("fine-tune with:")
    for config in spec.finetune_configs:
        print(f"  python tools/train_net.py --config-file configs/{config} "
              f"MODEL.WEIGHTS {args.output}")
    return 0


def main(argv=None):
    args = parse_args(argv)
    try:
        return convert(args)
    except BadInput as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT


if __name__ == "__main__":
    sys.exit(main())
