"""Every code snippet in docs/ runs as a doctest (pytest --doctest-glob='*.md'), with the
names below already defined, so the documentation cannot drift from the code."""
import os

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.path.join(REPO, "tests", "data")                        # vendored with the tests
STORIES = os.path.join(DATA, "stories260K.gguf")


@pytest.fixture(autouse=True)
def _doc_names(doctest_namespace):
    if not os.path.exists(STORIES):
        pytest.fail(f"docs need stories260K: looked for {STORIES}")
    doctest_namespace["STORIES"] = STORIES
    doctest_namespace["DATA"] = DATA
