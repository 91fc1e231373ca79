#!/usr/bin/env python
"""Export a d2_norms (or stock) detectron2 model to TorchScript and check it where it will run.

    python tools/export_model.py --config-file configs/synthetic/mask_rcnn_R18_FPN_GN.yaml \
        [--weights model_final.pth] --format torchscript --method trace|script \
        --output export_dir [--input image.png] [--atol 1e-4] [KEY VALUE ...]

Builds the model from the config, loads the weights (detectron2's DetectionCheckpointer;
without --weights: MODEL.WEIGHTS, or random initialisation when that is empty; weights that do
not fit the model are refused), folds weight standardization (GNWS, NF) into plain convs and
exports through detectron2's export API (TracingAdapter + torch.jit.trace, or
scripting_with_instances). The eager reference and the export both use FRN's eager kernels (the
ones a TorchScript graph holds; the default may be torch.compile-d ones, which sum in another
order). ``<output>/model.ts`` and ``<output>/model.schema.json`` (inputs, output names / order /
dtypes / shapes, loading code, check result) are written under temporary names, the model file
is loaded and run in a FRESH Python process that imports torch and torchvision only, its outputs
are compared with eager on a sample input (``--input``, else image 0 of the synthetic shapes
validation set), and only then are both renamed into place. See docs/export.md.

Exit codes: 0 exported and checked; 1 the export or its check failed (the file does not load or
run in a fresh process, or its outputs differ from eager by more than --atol); 2 bad input
(config, weights, input image, options). Nothing is written or left in --output unless 0.
"""
import argparse
import json
import os
import sys

import d2_norms  # noqa: F401  (shims + registrations before detectron2 builds anything)

EXIT_FAILED = 1
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


def _versions():
    import torch
    import torchvision

    import detectron2

    return {"torch": torch.__version__, "torchvision": torchvision.__version__,
            "detectron2": detectron2.__version__, "d2_norms": d2_norms.__version__}


def _model_info(cfg, rcnn, config_file, weights, num_folded):
    from detectron2.data import MetadataCatalog

    info = {"meta_architecture": cfg.MODEL.META_ARCHITECTURE, "config": config_file,
            "weights": weights or None, "folded_convs": num_folded,
            "num_classes": int(cfg.MODEL.ROI_HEADS.NUM_CLASSES if rcnn
                               else cfg.MODEL.RETINANET.NUM_CLASSES)}
    for name in tuple(cfg.DATASETS.TEST) + tuple(cfg.DATASETS.TRAIN):
        if name in MetadataCatalog.list():
            classes = MetadataCatalog.get(name).get("thing_classes")
            if classes:
                info["thing_classes"] = list(classes)
                break
    return info


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.format != "torchscript":
        return _bad_input(f"--format {args.format!r} is not supported; use --format torchscript")
    from d2_norms import export as X

    if args.method not in X.EXPORT_METHODS:
        return _bad_input(f"--method {args.method!r} is not supported; use one of "
                          f"{', '.join(X.EXPORT_METHODS)}")
    if not args.atol >= 0:  # also NaN
        return _bad_input(f"--atol must be a number >= 0, got {args.atol}")
    if args.weights is not None and not os.path.isfile(args.weights):
        return _bad_input(f"--weights {args.weights} does not exist")
    if args.input is not None and not os.path.isfile(args.input):
        return _bad_input(f"--input {args.input} does not exist")
    if os.path.exists(args.output) and not os.path.isdir(args.output):
        return _bad_input(f"--output {args.output} exists and is not a directory")

    from detectron2.checkpoint import DetectionCheckpointer
    from detectron2.modeling import build_model

    from d2_norms import export_check as C
    from d2_norms.engine.defaults import resolve_device
    from d2_norms.engine.errors import user_error_types
    from d2_norms.engine.preflight import add_model_context, check_weights_file, load_config

    opts = [o for o in args.opts if o != "--"]
    try:
        cfg = load_config(args.config_file, opts)
        resolve_device(cfg)
        cfg.freeze()
        try:
            model = build_model(cfg).eval()
        except user_error_types() as e:
            raise add_model_context(e, cfg, args.config_file) from None
        except Exception as e:  # a config detectron2 cannot build (unknown names, ...)
            return _bad_input(f"cannot build the model from {args.config_file}: "
                              f"{type(e).__name__}: {e}")
        weights = args.weights if args.weights is not None else cfg.MODEL.WEIGHTS
        if weights:
            if "://" not in weights and not os.path.isfile(weights):
                return _bad_input(f"MODEL.WEIGHTS {weights} does not exist")
            shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
            # refuses unreadable files and weights that do not fit (a half-random export)
            try:
                check_weights_file(cfg, weights, shapes, action="export",
                                   config_file=args.config_file)
            except user_error_types():
                raise
            except Exception as e:  # truncated zip, pickle garbage, a file of another kind
                first = str(e).splitlines()[0] if str(e) else ""
                return _bad_input(f"weights file {weights} cannot be read as a checkpoint "
                                  f"({type(e).__name__}: {first})")
            DetectionCheckpointer(model).load(weights)
        else:
            print("export_model.py: no weights given (--weights / MODEL.WEIGHTS): exporting the "
                  "randomly initialised model", file=sys.stderr)
    except user_error_types() as e:
        return _bad_input(str(e).strip("'\""))
    try:
        inputs = sample_inputs(cfg, args.input)
    except Exception as e:  # not an image, truncated, unsupported format
        return _bad_input(f"cannot read --input {args.input} as an image: "
                          f"{type(e).__name__}: {e}")

    num_folded = len(X.standardized_convs(model))
    # FRN's eager kernels for the reference and the export: the graph cannot hold compiled ones
    with X.eager_frn_kernels():
        eager = X.run_eager(model, inputs)
        folded = X.prepare_for_export(model)
        try:
            exported = X.export_torchscript(folded, inputs, args.method)
        except X.ExportError as e:
            return _bad_input(str(e))
    resize = {"shortest_edge": int(cfg.INPUT.MIN_SIZE_TEST),
              "max_size": int(cfg.INPUT.MAX_SIZE_TEST),
              "how": "detectron2.data.transforms.ResizeShortestEdge, as DefaultPredictor"}
    schema = {
        "format": "torchscript",
        "model": _model_info(cfg, exported.rcnn, args.config_file, weights, num_folded),
        "input": C.input_spec(model, inputs[0]["image"], resize),
        "exported_with": _versions(),
        "check": {"image": args.input or "image 0 of the synthetic shapes validation set",
                  "frn_kernels": "eager (the kernels the exported graph holds)"},
    }
    info = {"config": args.config_file, "weights": weights or None, "method": args.method,
            "folded_convs": num_folded, "outputs": exported.names,
            "detections": int(eager[0]["scores"].numel())}
    model_path = os.path.join(args.output, C.MODEL_FILE)
    try:
        written = C.write_checked_export(exported, eager, inputs, args.output, schema,
                                         atol=args.atol, device=cfg.MODEL.DEVICE)
    except C.ExportCheckError as e:
        if e.diffs:
            print(json.dumps(dict(info, max_abs_diff=e.diffs), indent=1))
        print(f"export_model.py: {e}\nexport_model.py: nothing written to {args.output}",
              file=sys.stderr)
        return EXIT_FAILED
    diffs = written["check"]["max_abs_diff"]
    worst = max(diffs.values()) if diffs else 0.0
    info["max_abs_diff"] = diffs
    info["files"] = [model_path, os.path.join(args.output, C.SCHEMA_FILE)]
    print(json.dumps(info, indent=1))
    print(f"wrote {model_path}; max difference to eager: {worst:.3g} "
          f"({info['detections']} detections compared, the file run in a fresh process)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
