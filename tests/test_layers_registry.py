"""The norm registry (names, errors, third-party registration), the composer's conv kinds, and
the get_norm hook's installation in detectron2."""
import sys

import pytest
import torch
from torch import nn

import d2_norms  # noqa: F401
import d2_norms.layers as L
from d2_norms.layers import (FilterResponseNorm2d, GroupNorm, ScaledStdConv2d,
                             StockComponentNormError, WSConv2d, conv_norm_act, get_norm,
                             get_norm_act, register_norm, registered_norms)
from d2_norms.layers import detectron2_hook

torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def eager_frn():
    previous = L.frn._IMPL
    L.set_frn_impl("eager")  # compiled kernels are tested in test_layers_frn
    yield
    L.set_frn_impl(previous)


def test_builtin_names_build_expected_modules():
    from detectron2.layers import FrozenBatchNorm2d

    assert get_norm("", 8) is None and get_norm(None, 8) is None
    assert type(get_norm("BN", 8)) is nn.BatchNorm2d
    assert isinstance(get_norm("SyncBN", 8), nn.SyncBatchNorm)
    assert isinstance(get_norm("FrozenBN", 8), FrozenBatchNorm2d)
    gn = get_norm("GN", 64)
    assert isinstance(gn, GroupNorm) and gn.num_groups == 32
    frn = get_norm("FRN", 8)
    assert isinstance(frn, FilterResponseNorm2d) and not frn.has_tlu and not frn.learned_eps
    assert get_norm("FRN_LEPS", 8).learned_eps
    assert get_norm("NF", 8) is None  # no activation normalization: the conv has gain and bias
    assert isinstance(get_norm(lambda c: nn.LayerNorm(c), 5), nn.LayerNorm)
    for name in ("BN", "SyncBN", "FrozenBN", "GN", "GNWS", "FRN", "NF"):
        assert name in registered_norms()


def test_get_norm_act_pairs():
    frn = get_norm_act("FRN", 16)
    assert isinstance(frn, FilterResponseNorm2d) and frn.has_tlu  # FRN + TLU fused
    assert not get_norm_act("FRN", 16, apply_act=False).has_tlu
    for name in ("BN", "GN", "GNWS", "FrozenBN", "SyncBN"):
        mod = get_norm_act(name, 32)
        assert isinstance(mod.act, nn.ReLU) and type(mod.norm) is type(get_norm(name, 32))
        assert type(get_norm_act(name, 32, apply_act=False)) is type(get_norm(name, 32))
    assert isinstance(get_norm_act("", 8), nn.ReLU)
    assert isinstance(get_norm_act("", 8, apply_act=False), nn.Identity)
    x = torch.randn(2, 32, 4, 4)
    mod = get_norm_act("GN", 32)
    torch.testing.assert_close(mod(x), torch.relu(mod.norm(x)))


def test_unknown_name_lists_registered_names():
    with pytest.raises(L.UnknownNormError) as info:
        get_norm("GroupNormm", 32)
    msg = str(info.value)
    assert "GroupNormm" in msg
    for name in ("BN", "GN", "GNWS", "FRN", "NF"):
        assert repr(name) in msg
    with pytest.raises(ValueError, match="Did you mean 'FRN'"):
        get_norm_act("frn", 32)
    with pytest.raises(ValueError, match="positive int"):
        get_norm("GN", 0)
    with pytest.raises(TypeError, match="norm must be"):
        get_norm(3, 8)


def test_third_party_registration_and_duplicates():
    class MyNorm(nn.Module):
        def __init__(self, c):
            super().__init__()
            self.scale = nn.Parameter(torch.ones(c))

        def forward(self, x):
            return x * self.scale.view(1, -1, 1, 1) / (x.abs().amax(dim=(2, 3), keepdim=True) + 1)

    try:
        @register_norm("TestMyNorm", activation=lambda c: nn.SiLU(), conv="ws")
        def my_norm(channels):
            return MyNorm(channels)

        assert "TestMyNorm" in registered_norms()
        assert isinstance(get_norm("TestMyNorm", 4), MyNorm)
        pair = get_norm_act("TestMyNorm", 4)
        assert isinstance(pair.norm, MyNorm) and isinstance(pair.act, nn.SiLU)
        assert L.norm_uses_weight_standardization("TestMyNorm")
        assert isinstance(conv_norm_act(4, 4, 3, norm="TestMyNorm"), WSConv2d)
        with pytest.raises(ValueError, match="already registered"):
            register_norm("TestMyNorm")(my_norm)
        # d2_norms' components build it with the registered activation and conv ...
        from detectron2.layers import ShapeSpec
        from detectron2.modeling.meta_arch.retinanet import RetinaNetHead

        from d2_norms.modeling.heads import D2NormsRetinaNetHead

        kwargs = dict(input_shape=[ShapeSpec(channels=8)], num_classes=2, num_anchors=1,
                      conv_dims=[8, 8], norm="TestMyNorm")
        head = D2NormsRetinaNetHead(**kwargs)
        kinds = [type(m) for m in head.cls_subnet.modules()]
        assert kinds.count(nn.SiLU) == 2 and nn.ReLU not in kinds and kinds.count(WSConv2d) == 2
        assert kinds.count(MyNorm) == 2
        head([torch.randn(1, 8, 6, 6)])
        # ... and stock components, which would put ReLU after plain convs, refuse it
        with pytest.raises(StockComponentNormError, match="TestMyNorm"):
            RetinaNetHead(**kwargs)
    finally:
        L.unregister_norm("TestMyNorm")
    with pytest.raises(L.UnknownNormError):
        get_norm("TestMyNorm", 4)
    with pytest.raises(ValueError, match="conv must be"):
        register_norm("X", conv="deformable")
    with pytest.raises(ValueError, match="empty norm name"):
        register_norm("")


def test_conv_kinds_and_conv_norm_act():
    assert L.norm_uses_weight_standardization("GNWS")
    assert L.norm_uses_weight_standardization("GNWS_G16")
    assert not L.norm_uses_weight_standardization("GN")
    assert not L.norm_uses_weight_standardization("NF")
    assert L.norm_conv_kind("NF") == "scaled_ws" and L.norm_conv_kind("") == "plain"
    from detectron2.layers import Conv2d

    plain = conv_norm_act(8, 32, 3, norm="GN", stride=2, apply_act=False)
    assert type(plain) is Conv2d and plain.bias is None and isinstance(plain.norm, GroupNorm)
    assert plain.padding == (1, 1) and plain.stride == (2, 2)
    ws = conv_norm_act(8, 32, 3, norm="GNWS", activation_in_norm=True)
    assert isinstance(ws, WSConv2d) and isinstance(ws.norm.act, nn.ReLU)
    frn = conv_norm_act(8, 32, 3, norm="FRN")
    assert frn.norm.has_tlu and frn.activation is None
    nf = conv_norm_act(8, 32, 3, norm="NF")
    assert isinstance(nf, ScaledStdConv2d) and nf.norm is None and nf.bias is not None
    assert nf.gamma == pytest.approx(L.RELU_GAIN)
    assert conv_norm_act(3, 32, 7, norm="NF", input_activation=None).gamma == 1.0
    bare = conv_norm_act(8, 32, 1, norm="", apply_act=False)
    assert bare.bias is not None and bare.norm is None
    x = torch.randn(1, 8, 10, 10)
    for conv in (plain, ws, frn, nf, bare):
        assert torch.isfinite(conv(x)).all()


def test_detectron2_get_norm_replaced_everywhere():
    import detectron2.layers
    import detectron2.layers.batch_norm

    hook = detectron2_hook.detectron2_get_norm
    assert detectron2.layers.get_norm is hook
    assert detectron2.layers.batch_norm.get_norm is hook
    from detectron2.layers import get_norm as late_import  # what later imports see

    assert late_import is hook
    original = detectron2_hook._original()
    bound = {}
    for name, mod in list(sys.modules.items()):
        if name.startswith("detectron2") and mod is not None:
            fn = getattr(mod, "get_norm", None)
            assert fn is not original, f"{name} still binds detectron2's original get_norm"
            if fn is not None:
                bound[name] = fn
    for name in ("detectron2.layers.blocks", "detectron2.modeling.meta_arch.semantic_seg"):
        assert bound[name] is hook
    # the modules of the components the error messages name get a hook naming them
    for name, component in detectron2_hook.STOCK_COMPONENTS.items():
        assert isinstance(bound[name], detectron2_hook.StockGetNorm)
        assert bound[name].component is component
    assert L.install_get_norm_hook() is True  # idempotent


def test_names_unknown_to_registry_fall_back_to_detectron2(monkeypatch):
    """A newer detectron2 may know names (e.g. "LN") that are not registered here."""
    def newer_get_norm(norm, channels):
        if norm == "LN":
            return nn.GroupNorm(1, channels)
        raise KeyError(norm)

    monkeypatch.setitem(detectron2_hook._STATE, "original", newer_get_norm)
    monkeypatch.setitem(detectron2_hook._STATE, "names", frozenset({"LN"}))
    assert isinstance(get_norm("LN", 8), nn.GroupNorm)
    assert isinstance(detectron2_hook.detectron2_get_norm("LN", 8), nn.GroupNorm)
    with pytest.raises(L.UnknownNormError):
        get_norm("NoSuchNorm", 8)
    with pytest.raises(L.UnknownNormError, match="a stock detectron2 component"):
        detectron2_hook.detectron2_get_norm("NoSuchNorm", 8)


def test_retinanet_head_type_probe():
    """v0.6 RetinaNetHead calls get_norm(norm, 1) only to read the type: GN(32, 1) must not
    fail for the GN variants a stock head honours."""
    from detectron2.layers import ShapeSpec
    from detectron2.modeling.meta_arch.retinanet import RetinaNetHead

    for name in ("GN_C16", "GN_G8", "GN_G32_FALLBACK"):
        head = RetinaNetHead(input_shape=[ShapeSpec(channels=64)] * 2, num_classes=3,
                             num_anchors=2, conv_dims=[64, 64], norm=name)
        assert sum(isinstance(m, GroupNorm) for m in head.cls_subnet) == 2
        logits, _ = head([torch.randn(1, 64, 8, 8), torch.randn(1, 64, 4, 4)])
        assert torch.isfinite(logits[0]).all(), name
    # a real layer whose width G does not divide still reports the width and G ("GN" itself
    # is detectron2's own name and gives torch's GroupNorm: use a d2_norms spelling of G=32)
    with pytest.raises(L.GroupNormDivisibilityError, match=r"48 channels.*G=32"):
        RetinaNetHead(input_shape=[ShapeSpec(channels=48)], num_classes=3, num_anchors=2,
                      conv_dims=[48], norm="GN_G32")
    # only RetinaNet's binding treats width 1 as the type probe
    with pytest.raises(L.GroupNormDivisibilityError, match="1 channels"):
        detectron2_hook.detectron2_get_norm("GN_G32", 1)


def test_syncbn_cpu_single_process_behaves_like_bn():
    sync, bn = get_norm("SyncBN", 4), nn.BatchNorm2d(4)
    x = torch.randn(3, 4, 5, 5)
    torch.testing.assert_close(sync(x), bn(x))


def _syncbn_worker(rank, world, port, x, queue):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world)
    torch.set_num_threads(1)
    m = get_norm("SyncBN", x.shape[1])
    out = m(x[rank * 2:(rank + 1) * 2])
    queue.put((rank, out.detach(), m.running_mean.clone()))
    dist.barrier()
    dist.destroy_process_group()


@pytest.mark.slow
def test_syncbn_synchronises_on_cpu_with_gloo():
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    x = torch.randn(4, 3, 5, 5)
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_syncbn_worker, args=(r, 2, port, x, queue)) for r in range(2)]
    for p in procs:
        p.start()
    results = dict((r, (o, rm)) for r, o, rm in (queue.get(timeout=120) for _ in procs))
    for p in procs:
        p.join(timeout=60)
    bn = nn.BatchNorm2d(3)
    expected = bn(x)  # statistics of the whole batch of 4 across both processes
    torch.testing.assert_close(torch.cat([results[0][0], results[1][0]]), expected,
                               rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(results[0][1], bn.running_mean, rtol=1e-4, atol=1e-5)


def test_patch_reaches_modules_imported_before_d2_norms():
    """A project that bound detectron2's get_norm before d2_norms was imported gets ours too."""
    import subprocess

    import d2_norms.compat

    code = (
        "import sys, types, importlib.util\n"
        # shims without importing the d2_norms package (as with a full detectron2 build)
        f"spec = importlib.util.spec_from_file_location('shims', {d2_norms.compat.__file__!r})\n"
        "shims = importlib.util.module_from_spec(spec); spec.loader.exec_module(shims)\n"
        "shims.apply()\n"
        "from detectron2.layers import get_norm as original\n"
        "project = types.ModuleType('some_d2_project')\n"
        "project.get_norm = original\n"
        "sys.modules['some_d2_project'] = project\n"
        "import d2_norms, d2_norms.layers as L\n"
        "hook = L.detectron2_hook.detectron2_get_norm\n"
        "assert project.get_norm is hook\n"
        "from detectron2.modeling.meta_arch import semantic_seg\n"
        "assert semantic_seg.get_norm is hook\n"
        "print(type(project.get_norm('GN_G8', 8)).__name__)\n"
        "try:\n"
        "    project.get_norm('FRN', 8)\n"
        "except L.StockComponentNormError as e:\n"
        "    print('refused')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split()[-2:] == ["GroupNorm", "refused"]
