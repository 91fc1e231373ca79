#!/usr/bin/env python
"""Export a d2_norms (or stock) detectron2 model to TorchScript and check it against eager.

    python tools/export_model.py --config-file configs/synthetic/mask_rcnn_R18_FPN_GN.yaml \
        [--weights model_final.pth] --format torchscript --method trace|script \
        --output export_dir [--input image.png] [KEY VALUE ...]

Builds the model from the config, loads the weights (detectron2's DetectionCheckpointer;
without --weights: MODEL.WEIGHTS, or random initialisation when that is empty), folds weight
standardization (GNWS, NF) into plain convs, exports through detectron2's export API
(TracingAdapter + torch.jit.trace, or scripting_with_instances), writes ``<output>/model.ts``
atomically, re-loads that file and compares its outputs with the eager model on a sample input
(``--input``, else image 0 of the synthetic shapes validation set). Prints the largest
difference per output field. See docs/export.md.

Exit codes: 0 exported and equal within --atol; 1 exported outputs differ; 2 bad input.
"""
import argparse
import json
import os
import sys

import d2_norms  # noqa: F401  (shims + registrations before detectron2 builds anything)

EXIT_DIFFERS = 1
EXIT_BAD_INPUT = 2


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config-file", required=True, help="a detectron2 / d2_norms YAML")
    parser.add_argument("--weights", default=None,
                        help="checkpoint to export (default: MODEL.WEIGHTS of the config)")
    parser.add_argument("--format", default="torchscript", help="only 'torchscript'")
    parser.add_argument("--method", default="trace", help="'trace' (default) or 'script'")
    parser.add_argument("--output", required=True, help="directory for model.ts")
    parser.add_argument("--input", default=None,
                        help="image file to check the export on (default: a synthetic image)")
    parser.add_argument("--atol", type=float, default=1e-4,
                        help="largest accepted difference between eager and exported outputs")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides KEY VALUE ...")
    return parser.parse_args(argv)


def _bad_input(message: str) -> int:
    print(f"export_model.py: error: {message}", file=sys.stderr)
    return EXIT_BAD_INPUT


def sample_inputs(cfg, image_path=None):
    """The check input: ``image_path`` or image 0 of the synthetic validation set, read in
    cfg.INPUT.FORMAT and resized as detectron2's DefaultPredictor does."""
    import numpy as np
    import torch
    from detectron2.data import transforms as T

    if image_path is not None:
        from detectron2.data.detection_utils import read_image

        image = read_image(image_path, format=cfg.INPUT.FORMAT)
    else:
        from d2_norms.data import ShapesSpec, draw_image

        rgb, _ = draw_image(ShapesSpec(num_images=100, split="val"), 0)
        image = rgb[:, :, ::-1] if cfg.INPUT.FORMAT == "BGR" else rgb
    resize = T.ResizeShortestEdge([cfg.INPUT.MIN_SIZE_TEST] * 2, cfg.INPUT.MAX_SIZE_TEST)
    image = resize.get_transform(image).apply_image(np.ascontiguousarray(image))
    tensor = torch.as_tensor(np.ascontiguousarray(image.transpose(2, 0, 1))).float()
    return [{"image": tensor.to(cfg.MODEL.DEVICE)}]


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.format != "torchscript":
        return _bad_input(f"--format {args.format!r} is not supported; use --format torchscript")
    from d2_norms import export as X

    if args.method not in X.EXPORT_METHODS:
        return _bad_input(f"--method {args.method!r} is not supported; use one of "
                          f"{', '.join(X.EXPORT_METHODS)}")
    if args.weights is not None and not os.path.isfile(args.weights):
        return _bad_input(f"--weights {args.weights} does not exist")
    if args.input is not None and not os.path.isfile(args.input):
        return _bad_input(f"--input {args.input} does not exist")
    if os.path.exists(args.output) and not os.path.isdir(args.output):
        return _bad_input(f"--output {args.output} exists and is not a directory")

    from detectron2.checkpoint import DetectionCheckpointer
    from detectron2.modeling import build_model

    from d2_norms.engine.defaults import resolve_device
    from d2_norms.engine.errors import ConfigFileError, ConfigKeyError
    from d2_norms.engine.preflight import load_config

    opts = [o for o in args.opts if o != "--"]
    try:
        cfg = load_config(args.config_file, opts)
    except (ConfigFileError, ConfigKeyError) as e:
        return _bad_input(str(e).strip("'\""))
    resolve_device(cfg)
    cfg.freeze()
    model = build_model(cfg).eval()
    weights = args.weights if args.weights is not None else cfg.MODEL.WEIGHTS
    if weights:
        if "://" not in weights and not os.path.isfile(weights):
            return _bad_input(f"MODEL.WEIGHTS {weights} does not exist")
        DetectionCheckpointer(model).load(weights)
    else:
        print("export_model.py: no weights given (--weights / MODEL.WEIGHTS): exporting the "
              "randomly initialised model", file=sys.stderr)
    inputs = sample_inputs(cfg, args.input)
    eager = X.run_eager(model, inputs)
    folded = X.prepare_for_export(model)
    num_folded = len(X.standardized_convs(model))
    try:
        exported = X.export_torchscript(folded, inputs, args.method)
    except X.ExportError as e:
        return _bad_input(str(e))
    path = os.path.join(args.output, "model.ts")
    X.save_torchscript(exported.module, path)
    reloaded = exported.with_module(X.load_torchscript(path, map_location=cfg.MODEL.DEVICE))
    diffs = X.compare_outputs(eager, reloaded(inputs))
    worst = max(diffs.values()) if diffs else 0.0
    info = {"config": args.config_file, "weights": weights or None, "method": args.method,
            "folded_convs": num_folded, "outputs": exported.names,
            "detections": int(eager[0]["scores"].numel()), "max_abs_diff": diffs}
    print(json.dumps(info, indent=1))
    print(f"wrote {path}; max difference to eager: {worst:.3g} "
          f"({info['detections']} detections compared)")
    if worst > args.atol:
        print(f"export_model.py: exported outputs differ from eager by {worst:.3g} > --atol "
              f"{args.atol}", file=sys.stderr)
        return EXIT_DIFFERS
    return 0


if __name__ == "__main__":
    sys.exit(main())
