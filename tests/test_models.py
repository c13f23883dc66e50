"""Tests for the CIFAR architectures registered in timm by ``import hf_graft``.

Expected parameter counts are derived here from the architecture description (layer shapes),
not read off the models, and checked against the counts of the grafting paper's networks, so a
wrong width, depth, stride layout or shortcut type fails.
"""
import math

import pytest
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.data import resolve_data_config

import hf_graft  # noqa: F401  (registers the models)
from hf_graft.models import CifarMobileNetV2, CifarResNet, CifarWideResNet, ZeroPadShortcut

RESNETS = {'cifar_resnet20': 20, 'cifar_resnet32': 32, 'cifar_resnet56': 56, 'cifar_resnet110': 110}
ALL_MODELS = sorted(list(RESNETS) + ['cifar_mobilenetv2', 'cifar_wrn28_10'])
# the grafting paper's CIFAR normalisation
CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2023, 0.1994, 0.2010)
# parameter counts of the paper's networks at 10 classes (option A) and of option B (+2,752 = two
# 1x1 projections 16->32 and 32->64 with their BatchNorms: 512 + 64 + 2048 + 128)
PAPER_RESNET_PARAMS = {
    'cifar_resnet20': 269_722, 'cifar_resnet32': 464_154, 'cifar_resnet56': 853_018, 'cifar_resnet110': 1_727_962}
OPTION_B_EXTRA = 16 * 32 + 2 * 32 + 32 * 64 + 2 * 64
PAPER_MBV2_PARAMS = 2_296_922
WRN28_10_PARAMS = 36_479_194
SMALL_WRN = dict(depth=10, widen_factor=2)  # one block per stage: fast tests of the same code


@pytest.fixture(autouse=True, scope='module')
def _one_thread():
    """Tiny CPU convs are far slower with 2 contending intra-op threads; restore afterwards."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def _n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _create(name: str, **kwargs) -> nn.Module:
    """The full network, except WRN-28-10 (36.5 M parameters), which most tests build small."""
    if name == 'cifar_wrn28_10':
        kwargs = {**SMALL_WRN, **kwargs}
    return timm.create_model(name, **kwargs)


def _conv(cin, cout, k):  # bias-free conv
    return cin * cout * k * k


def _bn(c):  # affine weight + bias
    return 2 * c


def expected_resnet_params(depth: int, num_classes: int, in_chans: int = 3, shortcut: str = 'A') -> int:
    """He et al. CIFAR ResNet; option A adds nothing where the shape changes, option B a 1x1 conv + BN."""
    n = (depth - 2) // 6
    total = _conv(in_chans, 16, 3) + _bn(16)
    cin = 16
    for cout in (16, 32, 64):
        for i in range(n):
            total += _conv(cin, cout, 3) + _bn(cout) + _conv(cout, cout, 3) + _bn(cout)
            if cin != cout and shortcut == 'B':  # first block of stages 2 and 3 (stride 2, width doubles)
                total += _conv(cin, cout, 1) + _bn(cout)
            cin = cout
    return total + 64 * num_classes + num_classes


# Paper table (t, c, n, s), with the CIFAR stride 1 in the second row.
MBV2_TABLE = [(1, 16, 1, 1), (6, 24, 2, 1), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1)]


def expected_mbv2_params(num_classes: int) -> int:
    """The paper's CIFAR MobileNetV2: an expansion conv in every block (t = 1 too), a 1x1 conv + BN
    projection on stride-1 blocks that change the width."""
    total = _conv(3, 32, 3) + _bn(32)
    cin = 32
    for t, c, n, s in MBV2_TABLE:
        for i in range(n):
            hidden = cin * t
            total += _conv(cin, hidden, 1) + _bn(hidden)
            total += hidden * 9 + _bn(hidden)  # depthwise 3x3
            total += _conv(hidden, c, 1) + _bn(c)
            if (s if i == 0 else 1) == 1 and cin != c:
                total += _conv(cin, c, 1) + _bn(c)
            cin = c
    total += _conv(320, 1280, 1) + _bn(1280)
    return total + 1280 * num_classes + num_classes


def expected_wrn_params(depth: int, k: int, num_classes: int) -> int:
    """Pre-activation Wide ResNet: per block BN + conv3x3 + BN + conv3x3 (+ 1x1 conv without BN where
    the shape changes), a final BN, a linear head."""
    n = (depth - 4) // 6
    total = _conv(3, 16, 3)
    cin = 16
    for cout in (16 * k, 32 * k, 64 * k):
        for _ in range(n):
            total += _bn(cin) + _conv(cin, cout, 3) + _bn(cout) + _conv(cout, cout, 3)
            if cin != cout:
                total += _conv(cin, cout, 1)
            cin = cout
    return total + _bn(cin) + cin * num_classes + num_classes


def test_list_models():
    assert set(ALL_MODELS) <= set(timm.list_models('cifar_*'))


@pytest.mark.parametrize('name', ALL_MODELS)
def test_output_shapes(name):
    model = timm.create_model(name, pretrained=False, num_classes=10).eval()  # full size, WRN-28-10 too
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
    assert _n_params(model) == expected_resnet_params(depth, 10) == PAPER_RESNET_PARAMS[name]
    assert _n_params(timm.create_model(name, num_classes=100)) == expected_resnet_params(depth, 100)
    option_b = timm.create_model(name, num_classes=10, shortcut='B')
    assert _n_params(option_b) == expected_resnet_params(depth, 10, shortcut='B')
    assert _n_params(option_b) == PAPER_RESNET_PARAMS[name] + OPTION_B_EXTRA


def test_resnet_param_counts_match_paper():
    """The ResNet paper's table: 0.27 M / 0.46 M / 0.85 M / 1.7 M."""
    counts = {n: _n_params(timm.create_model(n, num_classes=10)) for n in RESNETS}
    assert math.isclose(counts['cifar_resnet20'], 0.27e6, rel_tol=0.01)
    assert math.isclose(counts['cifar_resnet32'], 0.46e6, rel_tol=0.01)
    assert math.isclose(counts['cifar_resnet56'], 0.85e6, rel_tol=0.01)
    assert math.isclose(counts['cifar_resnet110'], 1.7e6, rel_tol=0.02)


def test_mobilenetv2_param_count():
    model = timm.create_model('cifar_mobilenetv2', pretrained=False, num_classes=10)
    assert _n_params(model) == expected_mbv2_params(10) == PAPER_MBV2_PARAMS
    assert _n_params(timm.create_model('cifar_mobilenetv2', num_classes=100)) == expected_mbv2_params(100)


def test_wide_resnet_param_count():
    """WRN-28-10: 36.5 M parameters (Zagoruyko & Komodakis, Table 4). Counted on the meta device."""
    model = timm.create_model('cifar_wrn28_10', num_classes=10, device='meta')
    assert isinstance(model, CifarWideResNet)
    assert _n_params(model) == expected_wrn_params(28, 10, 10) == WRN28_10_PARAMS
    assert math.isclose(WRN28_10_PARAMS, 36.5e6, rel_tol=0.001)
    assert _n_params(timm.create_model('cifar_wrn28_10', num_classes=100, device='meta')) == \
        expected_wrn_params(28, 10, 100)
    assert _n_params(_create('cifar_wrn28_10', num_classes=10)) == expected_wrn_params(10, 2, 10)
    widths = [m.out_channels for m in model.modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3)]
    assert widths == [16] + [160] * 8 + [320] * 8 + [640] * 8


@pytest.mark.parametrize('name', ALL_MODELS)
def test_pretrained_cfg_and_data_config(name):
    model = _create(name, pretrained=False)
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


@pytest.mark.parametrize('name', ['cifar_resnet20', 'cifar_mobilenetv2', 'cifar_wrn28_10'])
def test_drop_rate_applies_in_train_mode_only(name):
    model = _create(name, num_classes=4, drop_rate=1.0)
    feats = torch.randn(2, model.num_features, 4, 4)
    bias = model.get_classifier().bias
    with torch.no_grad():
        model.train()
        assert torch.allclose(model.forward_head(feats), bias.expand(2, 4))  # all features dropped
        model.eval()
        assert not torch.allclose(model.forward_head(feats), bias.expand(2, 4))


@pytest.mark.parametrize('name', ['cifar_resnet20', 'cifar_mobilenetv2', 'cifar_wrn28_10'])
def test_reset_classifier(name):
    model = _create(name, num_classes=10).eval()
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


def test_reset_classifier_initialises_the_head_as_the_model_does():
    torch.manual_seed(0)
    resnet = timm.create_model('cifar_resnet20', num_classes=10)
    resnet.reset_classifier(1000)  # 64,000 weights: the std is known to ~0.3%
    assert resnet.fc.weight.std().item() == pytest.approx(math.sqrt(2.0 / 64), rel=0.02)
    wrn = _create('cifar_wrn28_10', num_classes=10)
    wrn.reset_classifier(7)
    assert torch.all(wrn.fc.bias == 0)
    mbv2 = timm.create_model('cifar_mobilenetv2', num_classes=10)
    mbv2.reset_classifier(1000)  # PyTorch's default: U(-1/sqrt(fan_in), 1/sqrt(fan_in))
    bound = 1 / math.sqrt(1280)
    assert mbv2.classifier.weight.abs().max().item() <= bound
    assert mbv2.classifier.weight.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.02)


def test_basic_block_state_dict_order():
    model = timm.create_model('cifar_resnet20')
    keys = [k[len('layer2.0.'):] for k in model.state_dict() if k.startswith('layer2.0.') and k.endswith('weight')]
    assert keys == ['conv1.weight', 'bn1.weight', 'conv2.weight', 'bn2.weight']  # option A: no parameters
    assert isinstance(model.layer2[0].shortcut, ZeroPadShortcut)
    assert isinstance(model.layer2[1].shortcut, nn.Identity)

    model = timm.create_model('cifar_resnet20', shortcut='B')
    keys = [k[len('layer2.0.'):] for k in model.state_dict() if k.startswith('layer2.0.') and k.endswith('weight')]
    assert keys == [
        'conv1.weight', 'bn1.weight', 'conv2.weight', 'bn2.weight', 'shortcut.0.weight', 'shortcut.1.weight']
    assert isinstance(model.layer2[0].shortcut[0], nn.Conv2d)
    assert model.layer2[0].shortcut[0].kernel_size == (1, 1)
    assert model.layer2[0].shortcut[0].stride == (2, 2)
    assert isinstance(model.layer2[1].shortcut, nn.Identity)


def test_zero_padding_shortcut_matches_a_hand_reference():
    """Option A: every second pixel, the input's 16 channels between 8 zero channels on each side."""
    x = torch.randn(2, 16, 8, 8)
    sub = x[:, :, 0::2, 0::2]
    zeros = torch.zeros(2, 8, 4, 4)
    want = torch.cat([zeros, sub, zeros], dim=1)
    assert torch.equal(ZeroPadShortcut(16, 32, stride=2)(x), want)
    # fused layout: 3 inputs side by side, each padded on its own
    xs = [torch.randn(2, 16, 8, 8) for _ in range(3)]
    wide = ZeroPadShortcut(16, 32, stride=2).forward_grouped(torch.cat(xs, dim=1), 3)
    assert torch.equal(wide, torch.cat([ZeroPadShortcut(16, 32, 2)(xi) for xi in xs], dim=1))
    # the layout of the input is kept
    x_cl = x.contiguous(memory_format=torch.channels_last)
    out_cl = ZeroPadShortcut(16, 32, stride=2)(x_cl)
    assert out_cl.is_contiguous(memory_format=torch.channels_last) and torch.equal(out_cl, want)
    with pytest.raises(ValueError, match='narrow'):
        ZeroPadShortcut(32, 16)


def test_option_a_block_forward_equals_its_definition():
    torch.manual_seed(0)
    model = timm.create_model('cifar_resnet20').eval()
    block = model.layer3[0]  # 32 -> 64 channels, stride 2
    x = torch.randn(2, 32, 16, 16)
    with torch.no_grad():
        main = block.bn2(block.conv2(F.relu(block.bn1(block.conv1(x)))))
        shortcut = F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, 16, 16))
        assert torch.allclose(block(x), F.relu(main + shortcut), atol=1e-6)


def test_shortcut_is_validated():
    with pytest.raises(ValueError, match="shortcut must be one of"):
        timm.create_model('cifar_resnet20', shortcut='C')


@pytest.mark.parametrize('name,kwargs', [
    ('cifar_resnet20', {}), ('cifar_resnet20', {'shortcut': 'B'}), ('cifar_mobilenetv2', {}), ('cifar_wrn28_10', {})])
def test_every_bn_follows_the_conv_that_feeds_it_in_state_dict(name, kwargs):
    """The grafting code gives each BN the alpha of the nearest preceding conv in state_dict order:
    that conv must produce the BN's channels (post-activation blocks: in the same block)."""
    model = _create(name, **kwargs)
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
            if name != 'cifar_wrn28_10':  # pre-activation: a block's first BN follows the previous block's conv
                conv_name = next(n for n, m in modules.items() if m is last_conv)
                bn_name = key.rsplit('.', 1)[0]
                assert conv_name.rpartition('.')[0] == bn_name.rpartition('.')[0], (conv_name, bn_name)
    assert n_bn == sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())


def test_mobilenetv2_depthwise_and_strides():
    model = timm.create_model('cifar_mobilenetv2')
    dw = [m for m in model.modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3) and m.groups > 1]
    assert len(dw) == sum(n for _, _, n, _ in MBV2_TABLE) == 17
    for m in dw:
        assert m.groups == m.in_channels == m.out_channels
    assert model.conv_stem.stride == (1, 1)
    strides = [m.stride[0] for m in dw]
    # first block of each stage: 1, 1 (CIFAR change), 2, 2, 1, 2, 1
    first = [0, 1, 3, 6, 10, 13, 16]
    assert [strides[i] for i in first] == [1, 1, 2, 2, 1, 2, 1]
    assert sum(s == 2 for s in strides) == 3


def test_mobilenetv2_blocks_are_the_papers_cifar_variant():
    """ReLU, an expansion conv in every block (t = 1 too), a residual on every stride-1 block with
    a projection where the width changes."""
    model = timm.create_model('cifar_mobilenetv2').eval()
    assert not any(isinstance(m, nn.ReLU6) for m in model.modules())
    blocks = [b for stage in model.blocks for b in stage]
    assert len(blocks) == 17
    first = blocks[0]  # t = 1, 32 -> 16: a 32 -> 32 expansion conv
    assert (first.conv_pw.in_channels, first.conv_pw.out_channels) == (32, 32)
    assert all(isinstance(b.conv_pw, nn.Conv2d) for b in blocks)
    assert sum(b.has_residual for b in blocks) == 17 - 3
    projecting = [i for i, b in enumerate(blocks) if isinstance(b.shortcut, nn.Sequential)]
    assert projecting == [0, 1, 10, 16]  # 32->16, 16->24, 64->96, 160->320, all stride 1
    # a projecting block computes bn3(conv_pwl(...)) + bn(conv1x1(x))
    block = blocks[10]
    x = torch.randn(2, 64, 8, 8)
    with torch.no_grad():
        main = F.relu(block.bn1(block.conv_pw(x)))
        main = block.bn3(block.conv_pwl(F.relu(block.bn2(block.conv_dw(main)))))
        assert torch.allclose(block(x), main + block.shortcut[1](block.shortcut[0](x)), atol=1e-6)


def test_wide_resnet_block_is_pre_activation():
    torch.manual_seed(0)
    model = _create('cifar_wrn28_10', depth=16, conv_drop_rate=0.3).eval()  # two blocks per stage
    block = model.layer2[0]  # 32 -> 64 channels (k = 2), stride 2: projecting shortcut
    assert isinstance(block.shortcut, nn.Conv2d) and block.shortcut.kernel_size == (1, 1)
    assert block.shortcut.stride == (2, 2) and isinstance(block.drop, nn.Dropout) and block.drop.p == 0.3
    with torch.no_grad():
        for m in model.modules():  # non-trivial running statistics
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
        x = torch.randn(2, 32, 16, 16)
        pre = F.relu(block.bn1(x))
        want = block.conv2(F.relu(block.bn2(block.conv1(pre)))) + block.shortcut(pre)
        assert torch.allclose(block(x), want, atol=1e-5)
        plain = model.layer2[1]  # identity shortcut: the raw input is added
        y = torch.randn(2, 64, 8, 8)
        want = plain.conv2(F.relu(plain.bn2(plain.conv1(F.relu(plain.bn1(y)))))) + y
        assert torch.allclose(plain(y), want, atol=1e-5)
        feats = model.forward_features(torch.randn(2, 3, 32, 32))
    assert feats.min() >= 0  # ends with BN-ReLU
    with pytest.raises(ValueError, match='6n \\+ 4'):
        timm.create_model('cifar_wrn28_10', depth=27)


def test_init():
    """ResNets: Kaiming-normal fan-in convs and linear; MobileNetV2: PyTorch's default
    (uniform, bound 1/sqrt(fan_in)); WRN: Kaiming-normal fan-in convs, BN scales in U(0, 1), zero
    linear bias. BN shifts are zero everywhere."""
    torch.manual_seed(0)

    def largest_conv(model):
        return max((m for m in model.modules() if isinstance(m, nn.Conv2d)), key=lambda m: m.weight.numel())

    def fan_in(conv):
        return conv.in_channels // conv.groups * conv.kernel_size[0] * conv.kernel_size[1]

    resnet = timm.create_model('cifar_resnet56')
    big = largest_conv(resnet)  # 64 x 64 x 3 x 3
    assert big.weight.std().item() == pytest.approx(math.sqrt(2.0 / fan_in(big)), rel=0.03)
    assert resnet.fc.weight.std().item() == pytest.approx(math.sqrt(2.0 / 64), rel=0.1)  # 640 values
    bns = [m for m in resnet.modules() if isinstance(m, nn.BatchNorm2d)]
    assert all(torch.all(m.weight == 1) and torch.all(m.bias == 0) for m in bns)

    mbv2 = timm.create_model('cifar_mobilenetv2')
    big = largest_conv(mbv2)  # 1280 x 320 head conv
    bound = 1 / math.sqrt(fan_in(big))
    assert big.weight.abs().max().item() <= bound
    assert big.weight.abs().max().item() == pytest.approx(bound, rel=0.01)  # uniform: reaches its bound
    assert big.weight.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.02)
    bns = [m for m in mbv2.modules() if isinstance(m, nn.BatchNorm2d)]
    assert all(torch.all(m.weight == 1) and torch.all(m.bias == 0) for m in bns)

    wrn = _create('cifar_wrn28_10', widen_factor=4)
    big = largest_conv(wrn)  # 256 x 256 x 3 x 3
    assert big.weight.std().item() == pytest.approx(math.sqrt(2.0 / fan_in(big)), rel=0.03)
    scales = torch.cat([m.weight for m in wrn.modules() if isinstance(m, nn.BatchNorm2d)])
    assert 0 <= scales.min().item() and scales.max().item() < 1
    assert scales.mean().item() == pytest.approx(0.5, abs=0.05)
    assert all(torch.all(m.bias == 0) for m in wrn.modules() if isinstance(m, nn.BatchNorm2d))
    assert torch.all(wrn.fc.bias == 0)


@pytest.mark.parametrize('name', ['cifar_resnet20', 'cifar_mobilenetv2', 'cifar_wrn28_10'])
def test_train_forward_backward(name):
    torch.manual_seed(0)
    model = _create(name, num_classes=10).train()
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


@pytest.mark.parametrize('name', ['cifar_resnet20', 'cifar_mobilenetv2', 'cifar_wrn28_10'])
def test_features_only(name):
    model = _create(name, features_only=True).eval()
    with torch.no_grad():
        outs = model(torch.randn(2, 3, 32, 32))
    assert [o.shape[1] for o in outs] == model.feature_info.channels()
    assert [32 // o.shape[-1] for o in outs] == model.feature_info.reduction()
    assert outs[-1].shape[-1] == (4 if name == 'cifar_mobilenetv2' else 8)


def test_bad_depth_rejected():
    with pytest.raises(ValueError):
        CifarResNet(depth=21)
    with pytest.raises(ValueError):
        CifarWideResNet(depth=27)


def test_every_registered_architecture_is_known_to_the_registry_check():
    """hf_graft's list of its own architectures (config.json notes, error messages) is complete."""
    from hf_graft.models.registry import HF_GRAFT_ARCHITECTURES

    assert set(timm.list_models('cifar_*')) == set(HF_GRAFT_ARCHITECTURES) == set(ALL_MODELS)
