"""Every code snippet in docs/ runs as a doctest (pytest --doctest-glob='*.md'), with the
names below already defined, so the documentation cannot drift from the code."""
import os

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STORIES = os.path.join(REPO, "tests", "data", "stories260K.gguf")   # vendored with the tests


@pytest.fixture(autouse=True)
def _doc_names(doctest_namespace):
    if not os.path.exists(STORIES):
        pytest.fail(f"docs need stories260K: looked for {STORIES}")
    doctest_namespace["STORIES"] = STORIES
