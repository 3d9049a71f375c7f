"""Test-session settings.

The test models are tiny, so intra-op threads only add synchronisation (and, on a loaded
2-core machine, spin-waiting that made steps 5-10x slower): run the suite single-threaded.

Decoded Omniglot goes to one temporary cache for the session (``FUNCTIONAL_META_CACHE``),
not to the user's ``~/.cache``, unless that variable is already set.
"""

import os

import pytest
import torch

torch.set_num_threads(1)


@pytest.fixture(scope="session", autouse=True)
def session_cache(tmp_path_factory):
    if os.environ.get("FUNCTIONAL_META_CACHE"):
        yield
        return
    os.environ["FUNCTIONAL_META_CACHE"] = str(tmp_path_factory.mktemp("functional_meta_cache"))
    yield
    del os.environ["FUNCTIONAL_META_CACHE"]
