#!/usr/bin/env python
"""Generate the from-scratch COCO config matrix (configs/COCO-scratch/) from d2_norms/recipes.py.

    python tools/make_configs.py            # (re)write the files
    python tools/make_configs.py --check    # exit 1 if any committed file differs (CI does this)

Matrix: {RetinaNet, Mask R-CNN} x {R50, R101} x {BN, SyncBN, GN, GNWS, FRN, NF} x {1, 2, 4, 8}
images per GPU; RetinaNet at each FRN base lr {0.01, 0.05, 0.1} (0.05 unsuffixed, the others
``_lr0.01`` / ``_lr0.1``); plus the long ("9x") GN-paper schedule for Mask R-CNN R50.

The LazyConfigs need no generated copies: ``configs/lazy/COCO-scratch/*.py`` select any cell
with ``recipe.norm=... recipe.ims_per_gpu=...`` (the same rules, ``d2_norms/lazy/recipe.py``).
"""
import argparse
import os
import sys

import d2_norms  # noqa: F401
from d2_norms.recipes import write_matrix

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out-dir", default=os.path.join(REPO, "configs", "COCO-scratch"))
    parser.add_argument("--check", action="store_true",
                        help="compare with the files on disk instead of writing")
    args = parser.parse_args(argv)
    drift = write_matrix(args.out_dir, check=args.check)
    if args.check:
        if drift:
            print("configs differ from tools/make_configs.py's output (run it to regenerate):")
            print("\n".join("  " + d for d in drift))
            return 1
        print("configs are up to date")
    else:
        print(f"wrote configs to {args.out_dir} ({len(drift)} changed)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
