"""The norm registry (names, errors, third-party registration), the composer's conv kinds, and
detectron2's own get_norm left untouched by the import."""
import sys

import pytest
import torch
from torch import nn

import d2_norms  # noqa: F401
import d2_norms.layers as L
from d2_norms.layers import (FilterResponseNorm2d, GroupNorm, ScaledStdConv2d, WSConv2d,
                             conv_norm_act, get_norm, get_norm_act, register_norm,
                             registered_norms)
from d2_norms.layers import detectron2_names

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
        # ... stock components, which would put ReLU after plain convs, are refused by the
        # config checks (detectron2's own get_norm does not know the name: its KeyError)
        from d2_norms.config_checks import PARTS, check_norm_name

        retinanet_part = next(p for p in PARTS if p.key == "MODEL.RETINANET.NORM")
        message = check_norm_name("TestMyNorm", retinanet_part, "RetinaNet")
        assert "TestMyNorm" in message and "weight-standardized" in message
        assert "D2NormsRetinaNet" in message
        assert check_norm_name("TestMyNorm", retinanet_part, "D2NormsRetinaNet") is None
        with pytest.raises(KeyError):
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


def test_detectron2_get_norm_is_left_as_it_is():
    import detectron2.layers
    import detectron2.layers.batch_norm

    original = detectron2.layers.batch_norm.get_norm
    assert original.__module__ == "detectron2.layers.batch_norm"
    assert detectron2.layers.get_norm is original
    for name, mod in list(sys.modules.items()):
        if name.startswith("detectron2") and mod is not None:
            fn = getattr(mod, "get_norm", None)
            if fn is not None and callable(fn):
                assert fn is original, f"{name}.get_norm is not detectron2's"


def test_names_unknown_to_registry_fall_back_to_detectron2(monkeypatch):
    """A newer detectron2 may know names (e.g. "LN") that are not registered here."""
    def newer_get_norm(norm, channels):
        if norm == "LN":
            return nn.GroupNorm(1, channels)
        raise KeyError(norm)

    monkeypatch.setattr(detectron2_names, "_detectron2_get_norm", lambda: newer_get_norm)
    monkeypatch.setattr(detectron2_names, "_NAMES", [])
    assert detectron2_names.detectron2_norm_names() == frozenset({"LN"})
    assert isinstance(get_norm("LN", 8), nn.GroupNorm)
    assert detectron2_names.detectron2_norm("NoSuchNorm", 8) is None
    with pytest.raises(L.UnknownNormError):
        get_norm("NoSuchNorm", 8)


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


def test_modules_imported_before_d2_norms_keep_detectron2s_get_norm():
    """A project that bound detectron2's get_norm before d2_norms was imported keeps it."""
    import subprocess

    code = (
        "import sys, types\n"
        "import detectron2\n"
        "try:\n"
        "    from detectron2.layers import get_norm as original\n"
        "except ImportError:\n"
        "    import d2_norms\n"  # v0.6 without compiled ops imports only with d2_norms' shims
        "    from detectron2.layers import get_norm as original\n"
        "project = types.ModuleType('some_d2_project')\n"
        "project.get_norm = original\n"
        "sys.modules['some_d2_project'] = project\n"
        "import d2_norms\n"
        "from detectron2.modeling.meta_arch import semantic_seg\n"
        "assert project.get_norm is original and semantic_seg.get_norm is original\n"
        "try:\n"
        "    project.get_norm('FRN', 8)\n"
        "except KeyError:\n"
        "    print('detectron2 refuses FRN itself')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "detectron2 refuses FRN itself"

