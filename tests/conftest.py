import math

import pytest
import torch
from torch import nn


class ArticleECABlock(nn.Module):
    """The reference ECA block of the article (eca-article.txt), kept verbatim in its logic."""

    def __init__(self, channels, gamma=2, b=1):
        super().__init__()
        kernel_size = int(abs((math.log(channels, 2) + b) / gamma))
        kernel_size = kernel_size if kernel_size % 2 else kernel_size + 1
        self.avg_pool = nn.AdaptiveAvgPool2d(1)
        self.conv = nn.Conv1d(1, 1, kernel_size=kernel_size, padding=(kernel_size - 1) // 2, bias=False)
        self.sigmoid = nn.Sigmoid()

    def forward(self, x):
        v = self.avg_pool(x)
        v = self.conv(v.squeeze(-1).transpose(-1, -2)).transpose(-1, -2).unsqueeze(-1)
        v = self.sigmoid(v)
        return x * v


@pytest.fixture
def article_eca():
    return ArticleECABlock


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session", autouse=True)
def _session_cache(tmp_path_factory):
    """A module-scoped fixture (many convert) runs before ``_scan_cache``: the cache folder it
    writes is this session's, never the user's."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("ECA_SURGERY_CACHE", str(tmp_path_factory.mktemp("session-cache")))
        yield


@pytest.fixture(autouse=True)
def _scan_cache(tmp_path_factory, monkeypatch):
    """Each test scans with an empty cache of its own, never the user's."""
    monkeypatch.setenv("ECA_SURGERY_CACHE", str(tmp_path_factory.mktemp("scan-cache")))


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--reverse",
        action="store_true",
        help="run the tests in reversed order (after any reordering, e.g. pytest-randomly's), "
        "to show that no test depends on another having run first",
    )


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """With --reverse, reverse the final order of the collected tests."""
    if config.getoption("--reverse"):
        items.reverse()


def _order(config: pytest.Config) -> list[str]:
    """How this run orders the tests: pytest-randomly's seed, and whether --reverse is on."""
    lines = []
    if config.pluginmanager.hasplugin("randomly") and config.getoption("randomly_reorganize", False):
        lines.append(f"Using --randomly-seed={config.getoption('randomly_seed')}")
    if config.getoption("--reverse"):
        lines.append("Test order: reversed (--reverse)")
    return lines


@pytest.hookimpl(trylast=True)
def pytest_sessionstart(session: pytest.Session) -> None:
    """Under -q pytest prints no header: print the order (the seed to replay it) anyway."""
    config = session.config
    reporter = config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None and config.get_verbosity() < 0:
        for line in _order(config):
            reporter.write_line(line)


def pytest_report_header(config: pytest.Config) -> list[str]:
    return [line for line in _order(config) if not line.startswith("Using --randomly-seed")]
