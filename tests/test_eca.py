import math

import pytest
import torch

from eca_surgery.eca import eca_kernel_size, make_eca


def paper_rule(c, gamma=2, b=1):
    t = int(abs((math.log2(c) + b) / gamma))
    return t if t % 2 else t + 1


@pytest.mark.parametrize("channels", [1, 2, 4, 7, 8, 16, 24, 64, 96, 256, 512, 1000, 1024, 2048, 4096])
def test_kernel_size_follows_the_adaptive_rule(channels):
    assert eca_kernel_size(channels) == paper_rule(channels)
    assert eca_kernel_size(channels) % 2 == 1


def test_kernel_size_known_values_and_options():
    assert [eca_kernel_size(c) for c in (4, 64, 256, 512, 1024, 2048)] == [1, 3, 5, 5, 5, 7]
    assert eca_kernel_size(256, gamma=1, b=0) == 9
    assert make_eca(256, kernel_size=9).conv.kernel_size == (9,)
    with pytest.raises(ValueError):
        make_eca(256, kernel_size=4)


def test_parameter_is_named_like_timm():
    eca = make_eca(2048)
    assert list(eca.state_dict()) == ["conv.weight"]
    assert eca.conv.weight.shape == (1, 1, 7)
    assert eca.conv.bias is None


@pytest.mark.parametrize("channels,size", [(64, 9), (256, 14), (2048, 7), (6, 5)])
@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("channels_last", [False, True])
def test_matches_article_reference(article_eca, channels, size, batch, channels_last):
    ours = make_eca(channels)
    ref = article_eca(channels)
    assert ref.conv.weight.shape == ours.conv.weight.shape
    ref.conv.weight.data.copy_(ours.conv.weight)
    x = torch.randn(batch, channels, size, size)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    y = ours(x)
    assert y.shape == x.shape and y.dtype == x.dtype
    assert (y - ref(x)).abs().max().item() < 1e-6


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision(dtype):
    eca = make_eca(512)
    x = torch.randn(2, 512, 7, 7)
    expected = eca(x)
    y = eca.to(dtype)(x.to(dtype))
    assert y.dtype == dtype and y.shape == x.shape
    torch.testing.assert_close(y.float(), expected, atol=0.05, rtol=0.02)


def test_torch_compile():
    eca = make_eca(256).eval()
    compiled = torch.compile(eca)
    for batch in (2, 5):
        x = torch.randn(batch, 256, 7, 7)
        torch.testing.assert_close(compiled(x), eca(x))
