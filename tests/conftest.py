import os

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The project's shared reference material (the authors' key list and fixtures) lies beside
# the checkout; SOIT_SHARED_DIR points elsewhere.
SHARED = os.environ.get("SOIT_SHARED_DIR", os.path.join(os.path.dirname(REPO), "shared"))


def shared_file(*parts):
    """Path of a file of the shared reference material; fails (never skips) when missing."""
    path = os.path.join(SHARED, *parts)
    if not os.path.isfile(path):
        pytest.fail(f"{path} is missing: these tests need the shared reference files (set SOIT_SHARED_DIR)")
    return path
