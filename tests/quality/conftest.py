"""The trained checkpoint's bundle, built once for the evaluation tests (it writes words, so tasks mean something)."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def trained_bundle(tmp_path_factory):
    from llama4_deploy.build import build

    return build(recipe="tiny-trained", out=tmp_path_factory.mktemp("eval") / "tiny-trained", log=lambda m: None).bundle


@pytest.fixture(scope="session")
def trained_engine(trained_bundle):
    from llama4_deploy.runtime import load

    with load(trained_bundle, threads=2) as engine:
        yield engine
