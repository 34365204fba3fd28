"""Shared pytest configuration for the dfm_hf tests.

No test may reach huggingface.co: all Hub traffic goes to a `LoopbackHub` (see tests/hub_server.py) started when this
file is imported. `huggingface_hub` reads HF_ENDPOINT, HF_HOME, offline mode... once, when it is first imported, and
pytest imports this conftest before any test module, so the environment below is in place before that happens.
"""

import os
import shutil
import sys
import tempfile
import uuid

import pytest

try:  # tests/ is a package
    from .hub_server import LoopbackHub
except ImportError:  # pytest's default "prepend" import mode puts tests/ itself on sys.path
    from hub_server import LoopbackHub

HF_TOKEN = "hf_dummy_token_for_loopback"

if "huggingface_hub" in sys.modules:
    raise RuntimeError(
        "huggingface_hub was imported before tests/conftest.py (by a plugin or a root conftest?): it has already "
        "read its endpoint and cache settings, so the tests would not use the loopback Hub."
    )

# One Hub for the whole session. It must be listening now: its port goes into HF_ENDPOINT. Writes need HF_TOKEN.
_HUB = LoopbackHub(token=HF_TOKEN).start()
_HF_HOME = tempfile.mkdtemp(prefix="dfm-hf-home-")  # empty cache, token file... for the session
# Nothing the tests do may write outside a temp folder: the default model's materialised copy goes here too.
_DFM_CACHE = tempfile.mkdtemp(prefix="dfm-hf-cache-")

# Settings from the developer's shell that would bypass the loopback Hub, the temporary cache or the token.
for _name in (
    "HF_HUB_OFFLINE",
    "TRANSFORMERS_OFFLINE",
    "HUGGINGFACE_CO_STAGING",
    "HF_HUB_CACHE",
    "HUGGINGFACE_HUB_CACHE",
    "HF_ASSETS_CACHE",
    "HF_XET_CACHE",
    "HF_TOKEN_PATH",
    "HF_OIDC_RESOURCE",
    "HF_HUB_DISABLE_IMPLICIT_TOKEN",
):
    os.environ.pop(_name, None)
os.environ.update(
    HF_ENDPOINT=_HUB.endpoint,
    HF_TOKEN=HF_TOKEN,
    HF_HOME=_HF_HOME,
    DFM_HF_CACHE=_DFM_CACHE,
    XDG_CACHE_HOME=os.path.join(_HF_HOME, "xdg"),
    HF_HUB_DISABLE_XET="1",  # the loopback Hub speaks plain HTTP + LFS, not Xet
    HF_HUB_DISABLE_TELEMETRY="1",
    HF_HUB_DISABLE_PROGRESS_BARS="1",
)
# Never send loopback traffic through a proxy ("localhost" is the stand-in for the Hub's CDN).
for _name in ("NO_PROXY", "no_proxy"):
    os.environ[_name] = ",".join(filter(None, [os.environ.get(_name), "127.0.0.1", "localhost"]))


def pytest_unconfigure(config: pytest.Config) -> None:
    _HUB.stop()
    shutil.rmtree(_HF_HOME, ignore_errors=True)
    shutil.rmtree(_DFM_CACHE, ignore_errors=True)


@pytest.fixture(scope="session")
def hub_server() -> LoopbackHub:
    """The loopback Hub that HF_ENDPOINT points to, shared by the whole session."""
    return _HUB


@pytest.fixture
def hub_repo_id(hub_server: LoopbackHub) -> str:
    """A repo id that no other test uses (the repo itself is not created)."""
    return f"dfm-test/{uuid.uuid4().hex[:16]}"


def pytest_configure(config: pytest.Config) -> None:
    """Tiny test models run fastest on one thread; two threads fight other processes on a 2-core CI box."""
    import torch

    torch.set_num_threads(1)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """The fast tier first, then the ``slow`` tests: the full run (the README's command) fails fast on a unit
    regression; ``pytest -m "not slow"`` runs the fast tier alone. Order within each tier is kept."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is not None)


@pytest.fixture
def one_thread():
    """Single-threaded torch for in-process runs, restored afterwards: tiny models run fastest on one thread, and on
    a busy 2-core machine the default thread pool spins and is far slower. Modules that train use it for every test
    (``pytestmark = pytest.mark.usefixtures("one_thread")``)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
