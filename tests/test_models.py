"""Tests for the CIFAR architectures registered in timm by ``import hf_graft``.

Expected parameter counts are derived here from the architecture description (layer shapes),
not read off the models, so a wrong width, depth, stride layout or shortcut type fails.
"""
import math

import pytest
import timm
import torch
import torch.nn as nn
from timm.data import resolve_data_config

import hf_graft  # noqa: F401  (registers the models)
from hf_graft.models import CifarMobileNetV2, CifarResNet

RESNETS = {'cifar_resnet20': 20, 'cifar_resnet32': 32, 'cifar_resnet56': 56, 'cifar_resnet110': 110}
ALL_MODELS = sorted(list(RESNETS) + ['cifar_mobilenetv2'])
CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2470, 0.2435, 0.2616)


@pytest.fixture(autouse=True, scope='module')
def _one_thread():
    """Tiny CPU convs are far slower with 2 contending intra-op threads; restore afterwards."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def _n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _conv(cin, cout, k):  # bias-free conv
    return cin * cout * k * k


def _bn(c):  # affine weight + bias
    return 2 * c


def expected_resnet_params(depth: int, num_classes: int, in_chans: int = 3) -> int:
    """He et al. CIFAR ResNet with option-B (1x1 conv + BN) projections where the shape changes."""
    n = (depth - 2) // 6
    total = _conv(in_chans, 16, 3) + _bn(16)
    cin = 16
    for cout in (16, 32, 64):
        for i in range(n):
            total += _conv(cin, cout, 3) + _bn(cout) + _conv(cout, cout, 3) + _bn(cout)
            if cin != cout:  # first block of stages 2 and 3 (stride 2, width doubles)
                total += _conv(cin, cout, 1) + _bn(cout)
            cin = cout
    return total + 64 * num_classes + num_classes


# Paper table (t, c, n, s); strides do not affect parameter counts.
MBV2_TABLE = [(1, 16, 1), (6, 24, 2), (6, 32, 3), (6, 64, 4), (6, 96, 3), (6, 160, 3), (6, 320, 1)]


def expected_mbv2_params(num_classes: int) -> int:
    total = _conv(3, 32, 3) + _bn(32)
    cin = 32
    for t, c, n in MBV2_TABLE:
        for _ in range(n):
            hidden = cin * t
            if t != 1:
                total += _conv(cin, hidden, 1) + _bn(hidden)
            total += hidden * 9 + _bn(hidden)  # depthwise 3x3
            total += _conv(hidden, c, 1) + _bn(c)
            cin = c
    total += _conv(320, 1280, 1) + _bn(1280)
    return total + 1280 * num_classes + num_classes


def test_list_models():
    assert set(ALL_MODELS) <= set(timm.list_models('cifar_*'))


@pytest.mark.parametrize('name', ALL_MODELS)
def test_output_shapes(name):
    model = timm.create_model(name, pretrained=False, num_classes=10).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        feats = model.forward_features(x)
        out = model(x)
        pre = model.forward_head(feats, pre_logits=True)
    pool = model.pretrained_cfg['pool_size']
    assert feats.shape == (2, model.num_features) + tuple(pool)
    assert pre.shape == (2, model.num_features)
    assert out.shape == (2, 10)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize('name,depth', sorted(RESNETS.items()))
def test_resnet_param_counts(name, depth):
    model = timm.create_model(name, pretrained=False, num_classes=10)
    assert _n_params(model) == expected_resnet_params(depth, 10)
    assert _n_params(timm.create_model(name, num_classes=100)) == expected_resnet_params(depth, 100)


def test_resnet_param_counts_match_paper():
    """Paper, Table 6: 0.27 M / 0.46 M / 0.85 M / 1.7 M (option B adds 2,752 to each)."""
    counts = {n: _n_params(timm.create_model(n, num_classes=10)) for n in RESNETS}
    assert math.isclose(counts['cifar_resnet20'], 0.27e6, rel_tol=0.02)
    assert math.isclose(counts['cifar_resnet32'], 0.46e6, rel_tol=0.02)
    assert math.isclose(counts['cifar_resnet56'], 0.85e6, rel_tol=0.01)
    assert math.isclose(counts['cifar_resnet110'], 1.7e6, rel_tol=0.02)
    assert counts['cifar_resnet56'] == 855_770


def test_mobilenetv2_param_count():
    model = timm.create_model('cifar_mobilenetv2', pretrained=False, num_classes=10)
    n = _n_params(model)
    assert n == expected_mbv2_params(10)
    # ImageNet MobileNetV2 1.0 has 3,504,872 parameters with a 1000-way head; only the head differs.
    assert n == 3_504_872 - 1281 * 1000 + 1281 * 10
    assert 2.2e6 <= n <= 2.4e6


@pytest.mark.parametrize('name', ALL_MODELS)
def test_pretrained_cfg_and_data_config(name):
    model = timm.create_model(name, pretrained=False)
    cfg = model.pretrained_cfg
    assert model.default_cfg is cfg
    assert cfg['input_size'] == (3, 32, 32)
    assert cfg['pool_size'] == ((4, 4) if name == 'cifar_mobilenetv2' else (8, 8))
    assert cfg['crop_pct'] == 1.0
    assert cfg['num_classes'] == 10 and model.num_classes == 10
    assert not cfg.get('url') and not cfg.get('hf_hub_id')
    # first_conv / classifier must name real modules (timm uses them to adapt in_chans / heads).
    modules = dict(model.named_modules())
    assert isinstance(modules[cfg['first_conv']], nn.Conv2d)
    assert modules[cfg['first_conv']].in_channels == 3
    assert modules[cfg['classifier']] is model.get_classifier()
    assert model.get_classifier(name_only=True) == cfg['classifier']

    data_cfg = resolve_data_config({}, model=model)
    assert data_cfg['input_size'] == (3, 32, 32)
    assert data_cfg['interpolation'] == 'bilinear'
    assert data_cfg['crop_pct'] == 1.0
    assert data_cfg['mean'] == pytest.approx(CIFAR_MEAN)
    assert data_cfg['std'] == pytest.approx(CIFAR_STD)


def test_timm_kwargs_plumbing():
    model = timm.create_model(
        'cifar_resnet20', pretrained=False, num_classes=7, in_chans=1, drop_rate=0.25, global_pool='max')
    assert isinstance(model, CifarResNet)
    assert model.conv1.in_channels == 1
    assert model.drop_rate == 0.25
    assert model.global_pool.pool_type == 'max'
    assert _n_params(model) == expected_resnet_params(20, 7, in_chans=1)
    with torch.no_grad():
        assert model.eval()(torch.randn(2, 1, 32, 32)).shape == (2, 7)

    mbv2 = timm.create_model('cifar_mobilenetv2', num_classes=5, in_chans=1)
    assert isinstance(mbv2, CifarMobileNetV2)
    with torch.no_grad():
        assert mbv2.eval()(torch.randn(2, 1, 32, 32)).shape == (2, 5)


@pytest.mark.parametrize('name', ['cifar_resnet20', 'cifar_mobilenetv2'])
def test_drop_rate_applies_in_train_mode_only(name):
    model = timm.create_model(name, num_classes=4, drop_rate=1.0)
    feats = torch.randn(2, model.num_features, 4, 4)
    bias = model.get_classifier().bias
    with torch.no_grad():
        model.train()
        assert torch.allclose(model.forward_head(feats), bias.expand(2, 4))  # all features dropped
        model.eval()
        assert not torch.allclose(model.forward_head(feats), bias.expand(2, 4))


@pytest.mark.parametrize('name', ['cifar_resnet20', 'cifar_mobilenetv2'])
def test_reset_classifier(name):
    model = timm.create_model(name, num_classes=10).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        model.reset_classifier(3)
        assert model.num_classes == 3 and model(x).shape == (2, 3)
        assert model.get_classifier().out_features == 3
        model.reset_classifier(0)
        assert isinstance(model.get_classifier(), nn.Identity)
        assert model(x).shape == (2, model.num_features)
        model.reset_classifier(6, global_pool='catavgmax')
        assert model.global_pool.pool_type == 'catavgmax'
        assert model.get_classifier().in_features == 2 * model.num_features
        assert model(x).shape == (2, 6)
        model.reset_classifier(0, global_pool='')
        pool = model.pretrained_cfg['pool_size']
        assert model(x).shape == (2, model.num_features) + tuple(pool)


def test_basic_block_state_dict_order():
    model = timm.create_model('cifar_resnet20')
    keys = [k[len('layer2.0.'):] for k in model.state_dict() if k.startswith('layer2.0.') and k.endswith('weight')]
    assert keys == [
        'conv1.weight', 'bn1.weight', 'conv2.weight', 'bn2.weight', 'shortcut.0.weight', 'shortcut.1.weight']
    assert isinstance(model.layer2[0].shortcut[0], nn.Conv2d)
    assert model.layer2[0].shortcut[0].kernel_size == (1, 1)
    assert model.layer2[0].shortcut[0].stride == (2, 2)
    assert isinstance(model.layer2[1].shortcut, nn.Identity)


@pytest.mark.parametrize('name', ['cifar_resnet20', 'cifar_mobilenetv2'])
def test_every_bn_follows_its_conv_in_state_dict(name):
    """The grafting code gives each BN the alpha of the nearest preceding conv in state_dict order."""
    model = timm.create_model(name)
    modules = dict(model.named_modules())
    last_conv = None
    n_bn = 0
    for key in model.state_dict():
        owner = modules[key.rsplit('.', 1)[0]]
        if isinstance(owner, nn.Conv2d):
            last_conv = owner
        elif isinstance(owner, nn.BatchNorm2d) and key.endswith('.weight'):
            n_bn += 1
            assert last_conv is not None and last_conv.out_channels == owner.num_features, key
            # and that conv sits in the same block (same parent module) as the BN it feeds
            conv_name = next(n for n, m in modules.items() if m is last_conv)
            bn_name = key.rsplit('.', 1)[0]
            assert conv_name.rpartition('.')[0] == bn_name.rpartition('.')[0], (conv_name, bn_name)
    assert n_bn == sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())


def test_mobilenetv2_depthwise_and_strides():
    model = timm.create_model('cifar_mobilenetv2')
    dw = [m for m in model.modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3) and m.groups > 1]
    assert len(dw) == sum(n for _, _, n in MBV2_TABLE) == 17
    for m in dw:
        assert m.groups == m.in_channels == m.out_channels
    assert model.conv_stem.stride == (1, 1)
    strides = [m.stride[0] for m in dw]
    # first block of each stage: 1, 1 (CIFAR change), 2, 2, 1, 2, 1
    first = [0, 1, 3, 6, 10, 13, 16]
    assert [strides[i] for i in first] == [1, 1, 2, 2, 1, 2, 1]
    assert sum(s == 2 for s in strides) == 3
    # identity residual only where the shape is kept
    n_res = sum(getattr(m, 'has_residual', False) for m in model.modules())
    assert n_res == sum(n - 1 for _, _, n in MBV2_TABLE)


@pytest.mark.parametrize('name', ALL_MODELS)
def test_init(name):
    torch.manual_seed(0)
    model = timm.create_model(name)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            assert torch.all(m.weight == 1) and torch.all(m.bias == 0)
    big = max((m for m in model.modules() if isinstance(m, nn.Conv2d)), key=lambda m: m.weight.numel())
    fan_out = big.out_channels * big.kernel_size[0] * big.kernel_size[1] // big.groups
    assert big.weight.std().item() == pytest.approx(math.sqrt(2.0 / fan_out), rel=0.05)


@pytest.mark.parametrize('name', ['cifar_resnet20', 'cifar_mobilenetv2'])
def test_train_forward_backward(name):
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=10).train()
    bn = next(m for m in model.modules() if isinstance(m, nn.BatchNorm2d))
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    loss = nn.functional.cross_entropy(model(x), y)
    loss.backward()
    assert torch.isfinite(loss)
    for pname, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), pname
    assert model.get_classifier().weight.grad.abs().sum() > 0
    assert int(bn.num_batches_tracked) == 1
    assert not torch.allclose(bn.running_mean, torch.zeros_like(bn.running_mean))


@pytest.mark.parametrize('name', ['cifar_resnet20', 'cifar_mobilenetv2'])
def test_features_only(name):
    model = timm.create_model(name, features_only=True).eval()
    with torch.no_grad():
        outs = model(torch.randn(2, 3, 32, 32))
    assert [o.shape[1] for o in outs] == model.feature_info.channels()
    assert [32 // o.shape[-1] for o in outs] == model.feature_info.reduction()
    assert outs[-1].shape[-1] == (4 if name == 'cifar_mobilenetv2' else 8)


def test_bad_depth_rejected():
    with pytest.raises(ValueError):
        CifarResNet(depth=21)
