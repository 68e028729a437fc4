"""Every code snippet in docs/ runs as a doctest (pytest --doctest-glob='*.md'), with the
names below already defined, so the documentation cannot drift from the code."""
import os

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.environ.get("NUMLLAMA_SHARED", os.path.join(os.path.dirname(REPO), "shared"))


@pytest.fixture(autouse=True)
def _doc_names(doctest_namespace):
    path = os.path.join(SHARED, "models", "stories260K.gguf")
    if not os.path.exists(path):
        pytest.fail(f"docs need stories260K: looked for {path}")
    doctest_namespace["STORIES"] = path
