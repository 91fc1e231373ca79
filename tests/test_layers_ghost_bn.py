"""BN_IMG<k> (``GhostBatchNorm2d``): per-GPU BN at k images per GPU, emulated on one device.

The reference is real: G = N / k gloo processes, each running ``nn.BatchNorm2d`` on its k images
under DDP (``broadcast_buffers=False``, as detectron2 builds it), against one process running
``BN_IMG<k>`` on all N images with the mean of the per-process losses; float64. Outputs per
image, input gradients (x G), parameter gradients, parameters after SGD steps and the running
statistics (the mean of the per-process buffers) agree. Then: k = N is ``nn.BatchNorm2d``
bitwise, eval uses running statistics, a batch k does not divide is refused with what to set,
gradcheck, and the name works in every place BN can go (ResNet, FPN, RPN head, RetinaNet head
shared and per level) with whole-model outputs equal to BN on each k-image slice.

Only torch is imported at module level: the spawned workers import this module.
"""
import os

import pytest
import torch
from torch import nn

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ---------------------------------------------------------------------------------------------
# The multi-process reference
# ---------------------------------------------------------------------------------------------
def _net(norm_layer):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, bias=False), norm_layer(4), nn.ReLU(),
                        nn.Conv2d(4, 2, 1))
    with torch.no_grad():  # an affine off its initial value, so its gradients mean something
        net[1].weight.uniform_(0.5, 1.5)
        net[1].bias.uniform_(-0.5, 0.5)
    return net.double()


def _data(n, steps):
    g = torch.Generator().manual_seed(1)
    xs = [torch.randn(n, 3, 5, 6, generator=g, dtype=torch.float64) * 2 + 1 for _ in range(steps)]
    ts = [torch.randn(n, 2, 5, 6, generator=g, dtype=torch.float64) for _ in range(steps)]
    return xs, ts


def _process_worker(rank, world, k, steps, port, out_dir):
    """Process ``rank`` of ``world``: plain nn.BatchNorm2d on images rank*k .. rank*k + k - 1."""
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world)
    net = _net(nn.BatchNorm2d)
    ddp = nn.parallel.DistributedDataParallel(net, broadcast_buffers=False)
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    xs, ts = _data(world * k, steps)
    record = []
    for x, t in zip(xs, ts):
        x = x[rank * k:(rank + 1) * k].clone().requires_grad_(True)
        y = ddp(x)
        loss = (y * t[rank * k:(rank + 1) * k]).sum()  # this process's loss
        opt.zero_grad()
        loss.backward()  # DDP: parameter gradients averaged over the processes
        record.append({"out": y.detach(), "x_grad": x.grad,
                       "grads": {n: p.grad.clone() for n, p in net.named_parameters()},
                       "buffers": {n: b.clone() for n, b in net.named_buffers()}})
        opt.step()
    torch.save({"steps": record, "params": {n: p.detach() for n, p in net.named_parameters()}},
               os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


def _compare_with_processes(tmp_path, free_port, world, k, steps):
    import torch.multiprocessing as mp

    from d2_norms.layers import get_norm

    mp.spawn(_process_worker, args=(world, k, steps, free_port(), str(tmp_path)), nprocs=world,
             join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]
    net = _net(lambda c: get_norm(f"BN_IMG{k}", c))
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    xs, ts = _data(world * k, steps)
    close = dict(rtol=1e-12, atol=1e-12)
    for step, (x, t) in enumerate(zip(xs, ts)):
        x = x.clone().requires_grad_(True)
        y = net(x)
        loss = (y * t).sum() / world  # the mean of the per-process losses
        opt.zero_grad()
        loss.backward()
        got = [r["steps"][step] for r in ranks]
        torch.testing.assert_close(y.detach(), torch.cat([g["out"] for g in got]), **close)
        torch.testing.assert_close(x.grad * world, torch.cat([g["x_grad"] for g in got]), **close)
        for name, p in net.named_parameters():
            for g in got:  # DDP's averaged gradient, the same on every process
                torch.testing.assert_close(p.grad, g["grads"][name], **close)
        for name, b in net.named_buffers():
            per_process = torch.stack([g["buffers"][name] for g in got])
            if b.is_floating_point():
                torch.testing.assert_close(b, per_process.mean(0), **close)
                if step > 0 or name.endswith("running_mean"):
                    # the processes' buffers differ: the layer holds their mean, not rank 0's
                    assert not torch.allclose(per_process[0], per_process[1]), name
            else:
                assert (per_process == b).all(), name  # num_batches_tracked
        opt.step()
    for name, p in net.named_parameters():
        for r in ranks:
            torch.testing.assert_close(p.detach(), r["params"][name], **close)


def test_equals_two_gloo_processes_of_plain_bn(tmp_path, free_port):
    """N = 4, k = 2: two real processes, two SGD steps (momentum)."""
    _compare_with_processes(tmp_path, free_port, world=2, k=2, steps=2)


@pytest.mark.slow
@pytest.mark.parametrize("world,k", [(4, 2), (3, 1)])
def test_equals_more_gloo_processes_of_plain_bn(tmp_path, free_port, world, k):
    _compare_with_processes(tmp_path, free_port, world=world, k=k, steps=3)


# ---------------------------------------------------------------------------------------------
# The layer
# ---------------------------------------------------------------------------------------------
def _pair(k, c=5):
    from d2_norms.layers import GhostBatchNorm2d

    torch.manual_seed(0)
    ghost = GhostBatchNorm2d(c, images_per_group=k)
    bn = nn.BatchNorm2d(c)
    with torch.no_grad():
        ghost.weight.uniform_(0.5, 1.5)
        ghost.bias.uniform_(-1, 1)
    bn.load_state_dict(ghost.state_dict())  # same names: checkpoints move between them
    return ghost, bn


def test_whole_batch_group_is_batchnorm_bitwise():
    ghost, bn = _pair(k=4)
    x = torch.randn(4, 5, 6, 7)
    xa, xb = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    ya, yb = ghost(xa), bn(xb)
    assert torch.equal(ya, yb)
    (ya * ya).sum().backward()
    (yb * yb).sum().backward()
    assert torch.equal(xa.grad, xb.grad) and torch.equal(ghost.weight.grad, bn.weight.grad)
    for (n, a), (_, b) in zip(ghost.state_dict().items(), bn.state_dict().items()):
        assert torch.equal(a, b), n


def test_groups_are_independent_batchnorms():
    ghost, bn = _pair(k=2)
    x = torch.randn(6, 5, 4, 4, dtype=torch.float64) * 3 + 2
    ghost.double()
    y = ghost(x)
    mean_buffers = {}
    for g in range(3):
        ref = nn.BatchNorm2d(5).double()
        ref.load_state_dict(_pair(k=2)[0].double().state_dict())
        torch.testing.assert_close(y[2 * g:2 * g + 2], ref(x[2 * g:2 * g + 2]))
        for n, b in ref.named_buffers():
            mean_buffers[n] = mean_buffers.get(n, 0) + b / 3
    torch.testing.assert_close(ghost.running_mean, mean_buffers["running_mean"])
    torch.testing.assert_close(ghost.running_var, mean_buffers["running_var"])
    assert int(ghost.num_batches_tracked) == 1


def test_cumulative_momentum_and_no_running_stats():
    from d2_norms.layers import GhostBatchNorm2d

    ghost = GhostBatchNorm2d(3, momentum=None, images_per_group=1).double()
    x = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    for _ in range(2):
        ghost(x)
    # cumulative average of two identical updates = that update
    per_image = x.mean((2, 3)).mean(0)
    torch.testing.assert_close(ghost.running_mean, per_image)
    free = GhostBatchNorm2d(3, track_running_stats=False, images_per_group=1).double().eval()
    y = free(x)  # batch statistics per image even in eval (no running statistics exist)
    torch.testing.assert_close(y[1:], nn.BatchNorm2d(3, track_running_stats=False).double()(x[1:]))


def test_eval_uses_running_statistics():
    ghost, bn = _pair(k=2)
    with torch.no_grad():
        ghost.running_mean.uniform_(-1, 1)
        ghost.running_var.uniform_(0.5, 2)
    bn.load_state_dict(ghost.state_dict())
    ghost.eval(), bn.eval()
    x = torch.randn(3, 5, 4, 4)  # 3 images: not a multiple of k, fine in eval
    assert torch.equal(ghost(x), bn(x))
    assert torch.equal(ghost(x[:1]), bn(x)[:1])  # image by image


def test_indivisible_training_batch_says_what_to_set():
    from d2_norms.layers import ImageGroupError

    ghost, _ = _pair(k=4)
    with pytest.raises(ImageGroupError, match=r"batch of 6 images.*multiple of 4.*IMS_PER_BATCH"):
        ghost(torch.randn(6, 5, 3, 3))
    with pytest.raises(ImageGroupError, match="batch of 2 images"):
        ghost(torch.randn(2, 5, 3, 3))
    with pytest.raises(ValueError, match="positive int"):
        from d2_norms.layers import GhostBatchNorm2d

        GhostBatchNorm2d(3, images_per_group=0)


def test_gradcheck():
    from torch.func import functional_call

    from d2_norms.layers import GhostBatchNorm2d

    ghost = GhostBatchNorm2d(2, images_per_group=2).double()

    def f(x, w, b):
        return functional_call(ghost, {"weight": w, "bias": b}, (x,))

    x = torch.randn(4, 2, 3, 2, dtype=torch.float64, requires_grad=True)
    w = (torch.rand(2, dtype=torch.float64) + 0.5).requires_grad_(True)
    b = torch.randn(2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(f, (x, w, b))
    assert torch.autograd.gradgradcheck(f, (x, w, b))


# ---------------------------------------------------------------------------------------------
# The name, in every place BN can go
# ---------------------------------------------------------------------------------------------
def test_registry_name():
    from d2_norms.layers import (GhostBatchNorm2d, UnknownNormError, get_norm, get_norm_spec,
                                 resolve_norm)

    m = get_norm("BN_IMG2", 8)
    assert type(m) is GhostBatchNorm2d and m.images_per_group == 2 and m.num_features == 8
    r = resolve_norm("BN_IMG16")
    assert r.conv_kind == "plain" and r.pairs_with_relu
    conv = r.conv_norm_act(3, 8, 3)
    assert isinstance(conv.norm, GhostBatchNorm2d) and isinstance(conv.activation, nn.ReLU)
    assert conv.bias is None  # the norm's bias shifts the output
    assert "16 images" in get_norm_spec("BN_IMG16").description
    for bad in ("BN_IMG", "BN_IMG0", "BN_IMG02", "bn_img2"):
        with pytest.raises(UnknownNormError):
            get_norm_spec(bad)


def test_optimizer_gives_it_norm_weight_decay():
    from d2_norms.layers import conv_norm_act
    from d2_norms.solver import normalizer_parameter_names

    model = nn.Sequential(conv_norm_act(3, 4, 3, norm="BN_IMG2"))
    assert set(normalizer_parameter_names(model)) == {"0.norm.weight", "0.norm.bias"}


def _cfg(norm, meta="RetinaNet", per_level=False):
    from detectron2.config import get_cfg

    from d2_norms.config import add_d2_norms_config

    cfg = get_cfg()
    add_d2_norms_config(cfg)
    if meta == "RetinaNet":
        cfg.merge_from_file(os.path.join(REPO, "configs", "synthetic", "retinanet_R18_FPN_GN.yaml"))
        cfg.merge_from_list(["MODEL.RETINANET.NORM", norm, "MODEL.RETINANET.NUM_CONVS", 2,
                             "MODEL.RETINANET.NORM_PER_LEVEL", per_level])
    else:
        cfg.merge_from_file(os.path.join(REPO, "configs", "synthetic", "mask_rcnn_R18_FPN_GN.yaml"))
        cfg.merge_from_list(["MODEL.RPN.HEAD_NAME", "D2NormsRPNHead", "MODEL.RPN.NORM", norm])
    cfg.merge_from_list(["MODEL.DEVICE", "cpu", "MODEL.RESNETS.NORM", norm, "MODEL.FPN.NORM", norm,
                         "MODEL.FPN.OUT_CHANNELS", 32])
    return cfg


def _image_level_outputs(model, x):
    feats = model.backbone(x)
    out = [feats[f] for f in sorted(feats)]
    if hasattr(model, "head"):
        logits, deltas = model.head([feats[f] for f in model.head_in_features])
        out += logits + deltas
    else:
        gen = model.proposal_generator
        logits, deltas = gen.rpn_head([feats[f] for f in gen.in_features])
        out += logits + deltas
    return out


@pytest.mark.parametrize("meta,per_level", [("RetinaNet", False), ("RetinaNet", True),
                                            ("GeneralizedRCNN", False)])
def test_model_equals_bn_on_each_group_of_images(meta, per_level):
    """Backbone (ResNet + FPN) and RetinaNet head (shared norms with per-level statistics, or one
    norm per level) / RPN head built with BN_IMG2 on 4 images = the same weights built with BN
    run on images 0-1 and 2-3 separately; its buffers = the mean of those two runs' buffers."""
    from detectron2.modeling import build_model

    from d2_norms.layers import GhostBatchNorm2d

    torch.set_num_threads(1)
    ghost = build_model(_cfg("BN_IMG2", meta, per_level)).double().train()
    kinds = {type(m) for m in ghost.modules() if isinstance(m, nn.BatchNorm2d)}
    assert kinds == {GhostBatchNorm2d}
    n_ghost = sum(isinstance(m, GhostBatchNorm2d) for m in ghost.modules())
    head = ghost.head if meta == "RetinaNet" else ghost.proposal_generator.rpn_head
    assert any(isinstance(m, GhostBatchNorm2d) for m in head.modules())
    state = ghost.state_dict()
    halves = []
    for _ in range(2):
        bn = build_model(_cfg("BN", meta, per_level)).double().train()
        assert sum(type(m) is nn.BatchNorm2d for m in bn.modules()) == n_ghost
        bn.load_state_dict(state)  # the same names
        halves.append(bn)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 3, 64, 64, generator=g, dtype=torch.float64)
    with torch.no_grad():
        got = _image_level_outputs(ghost, x)
        want = [torch.cat(parts) for parts in zip(*(_image_level_outputs(m, x[2 * i:2 * i + 2])
                                                    for i, m in enumerate(halves)))]
    assert len(got) == len(want)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)
    buffers = [dict(m.named_buffers()) for m in halves]
    for name, b in ghost.named_buffers():
        if name.endswith(("running_mean", "running_var")):
            torch.testing.assert_close(b, (buffers[0][name] + buffers[1][name]) / 2,
                                       rtol=1e-9, atol=1e-12)


def test_roi_heads_refuse_it_and_the_config_checks_say_so():
    from detectron2.modeling import build_model

    from d2_norms.config_checks import norm_problems
    from d2_norms.modeling.heads import HeadNormError

    cfg = _cfg("BN_IMG2", "GeneralizedRCNN")
    assert norm_problems(cfg) == []
    cfg.merge_from_list(["MODEL.ROI_BOX_HEAD.NORM", "BN_IMG2", "MODEL.ROI_MASK_HEAD.NORM",
                         "BN_IMG2"])
    problems = norm_problems(cfg)
    assert len(problems) == 2 and all("RoIs" in p for p in problems), problems
    with pytest.raises(HeadNormError, match="RoIs"):
        build_model(cfg)


def test_stock_components_given_it_are_problems():
    from d2_norms.config_checks import norm_problems

    cfg = _cfg("BN_IMG2", "GeneralizedRCNN")
    cfg.merge_from_list(["MODEL.BACKBONE.NAME", "build_resnet_fpn_backbone",
                         "MODEL.RPN.HEAD_NAME", "StandardRPNHead", "MODEL.RPN.NORM", ""])
    problems = norm_problems(cfg)
    assert [p.split("=")[0] for p in problems] == ["MODEL.RESNETS.NORM", "MODEL.FPN.NORM"]
    assert all("d2_norms name" in p and "build_d2n_" in p for p in problems), problems
    cfg = _cfg("BN_IMG2")
    cfg.merge_from_list(["MODEL.META_ARCHITECTURE", "RetinaNet"])
    assert any(p.startswith("MODEL.RETINANET.NORM='BN_IMG2'") for p in norm_problems(cfg))


@pytest.mark.parametrize("ims,ref,world,bad", [(4, 0, 1, False), (4, 0, 2, True), (8, 4, 1, True),
                                               (16, 4, 2, False), (6, 0, 1, True)])
def test_per_device_batch_check(ims, ref, world, bad):
    from d2_norms.config_checks import image_group_problems

    cfg = _cfg("BN_IMG2")
    cfg.merge_from_list(["MODEL.RESNETS.NORM", "BN_IMG4", "MODEL.FPN.NORM", "BN",
                         "MODEL.RETINANET.NORM", "GN", "SOLVER.IMS_PER_BATCH", ims,
                         "SOLVER.REFERENCE_WORLD_SIZE", ref])
    problems = image_group_problems(cfg, world)
    if not bad:
        assert problems == []
    else:
        assert len(problems) == 1 and problems[0].startswith("MODEL.RESNETS.NORM='BN_IMG4'")
        assert "multiple of 4" in problems[0] and "IMS_PER_BATCH" in problems[0]


def test_preflight_refuses_a_batch_k_does_not_divide(tmp_path):
    from d2_norms.engine.defaults import argument_parser, preflight
    from d2_norms.engine.errors import InputProblemsError

    args = argument_parser().parse_args([
        "--config-file", os.path.join(REPO, "configs", "synthetic", "retinanet_R18_FPN_GN.yaml"),
        "MODEL.DEVICE", "cpu", "MODEL.RESNETS.NORM", "BN_IMG3", "SOLVER.IMS_PER_BATCH", "4",
        "OUTPUT_DIR", str(tmp_path / "out")])
    with pytest.raises(InputProblemsError, match=r"BN_IMG3.*multiple of 3"):
        preflight(args, 1)
    assert not (tmp_path / "out").exists()
