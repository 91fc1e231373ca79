#!/usr/bin/env python
"""How much AGC clips in the first iterations of a config: per iteration, the fraction of
clipped units of the weights (conv / linear rows), of the vectors (biases, gains: one unit each,
the rule since issue 23; a Scaled WS gain (C, 1, 1, 1) counts as a vector) and, on the same
gradients, of the vector elements under the earlier element-wise rule. Trains with the config's own optimizer (the current rule).

    python tools/agc_clip_stats.py --config-file configs/synthetic/demo_mask_rcnn_R18_FPN_NF.yaml \\
        --iters 20 SOLVER.BASE_LR 0.08

Prints one line per iteration and the totals (docs/recipes.md quotes them).
"""
import argparse
import sys

import torch


def _clipped(w, g, lam, eps, unit_dim, elementwise):
    from d2_norms.solver.agc import unitwise_norm

    w, g = w.detach().float(), g.detach().float()
    if elementwise and w.squeeze().dim() <= 1:
        wn, gn = w.abs(), g.abs()
    else:
        wn, gn = unitwise_norm(w, unit_dim), unitwise_norm(g, unit_dim)
    clipped = gn > lam * wn.clamp(min=eps)
    scale = torch.where(clipped, lam * wn.clamp(min=eps) / gn.clamp(min=1e-30),
                        torch.ones_like(gn))
    after = (g * scale).norm()
    return int(clipped.sum()), int(clipped.numel()), float(after), float(g.norm())


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config-file", required=True)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("opts", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)

    import d2_norms  # noqa: F401
    from d2_norms.engine.defaults import setup_cfg
    from d2_norms.engine.trainer import Trainer
    from d2_norms.solver.agc import AGC_EPS
    from detectron2.utils.events import EventStorage

    class A:
        config_file = args.config_file
        opts = ["MODEL.DEVICE", "cpu", "DATALOADER.NUM_WORKERS", "0", *args.opts]
    cfg = setup_cfg(A, log=False)
    if not (cfg.SOLVER.CLIP_GRADIENTS.ENABLED and cfg.SOLVER.CLIP_GRADIENTS.CLIP_TYPE == "agc"):
        sys.exit("the config does not use AGC (SOLVER.CLIP_GRADIENTS.CLIP_TYPE: agc)")
    lam = float(cfg.SOLVER.CLIP_GRADIENTS.CLIP_VALUE)
    torch.manual_seed(cfg.SEED)
    model = Trainer.build_model(cfg).train()
    opt = Trainer.build_optimizer(cfg, model)
    sched = Trainer.build_lr_scheduler(cfg, opt)
    data = iter(Trainer.build_train_loader(cfg))
    kinds = ("weight units", "vector (new: one unit)", "vector elements (old rule)")
    total = {k: [0, 0] for k in kinds}
    # per vector kind (last name component: gain, bias, ...) and rule: clipped units, units,
    # ||clipped gradient||^2, ||raw gradient||^2
    by_kind = {}
    names = {id(p): n for n, p in model.named_parameters()}
    print(f"lambda {lam}, base lr {cfg.SOLVER.BASE_LR}, {cfg.SOLVER.IMS_PER_BATCH} images/it")
    with EventStorage(0) as storage:
        for it in range(args.iters):
            storage.iter = it
            losses = model(next(data))
            loss = sum(losses.values())
            opt.zero_grad()
            loss.backward()
            row = {k: [0, 0] for k in kinds}
            for group in opt.param_groups:
                if group.get("agc", True) is False:
                    continue
                unit_dim = group.get("agc_unit_dim", 0)
                for p in group["params"]:
                    if p.grad is None:
                        continue
                    if p.squeeze().dim() > 1:  # conv / linear weights: rows
                        c, n, _, _ = _clipped(p, p.grad, lam, AGC_EPS, unit_dim, False)
                        row["weight units"][0] += c
                        row["weight units"][1] += n
                        continue
                    for key, elementwise, rule in ((kinds[1], False, "new"),
                                                   (kinds[2], True, "old")):
                        c, n, after, before = _clipped(p, p.grad, lam, AGC_EPS, 0, elementwise)
                        row[key][0] += c
                        row[key][1] += n  # 1 for the new rule: the vector is one unit
                        acc = by_kind.setdefault((names[id(p)].rsplit(".", 1)[-1], rule),
                                                 [0, 0, 0.0, 0.0])
                        acc[0] += c
                        acc[1] += n
                        acc[2] += after ** 2
                        acc[3] += before ** 2
            for k in kinds:
                total[k][0] += row[k][0]
                total[k][1] += row[k][1]
            print(f"it {it:3d} loss {float(loss):8.3f} lr {opt.param_groups[0]['lr']:.2e} "
                  + "  ".join(f"{k}: {row[k][0]}/{row[k][1]}" for k in kinds), flush=True)
            opt.step()
            sched.step()
    print("total: " + "  ".join(f"{k}: {total[k][0]}/{total[k][1]} "
                                f"({100.0 * total[k][0] / max(1, total[k][1]):.1f}%)"
                                for k in kinds))
    for (kind, rule), (c, n, after, before) in sorted(by_kind.items()):
        print(f"{kind} vectors, {rule} rule: clipped {c}/{n} units ({100.0 * c / max(1, n):.1f}%), "
              f"gradient norm kept {(after / max(before, 1e-30)) ** 0.5:.4f}")


if __name__ == "__main__":
    main()
