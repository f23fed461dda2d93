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


@pytest.fixture(scope="session")
def nuclei_wheel_cache(tmp_path_factory):
    """Where the stardist wheel holding the nuclei data is downloaded once per session."""
    return str(tmp_path_factory.getbasetemp() / "stardist-wheel")


@pytest.fixture(scope="session")
def nuclei(tmp_path_factory, nuclei_wheel_cache):
    """The quick-start nuclei dataset (DATA.md), prepared once per session: the dict of
    ``soit.data.nuclei.prepare_nuclei``. A failed download fails (no skip): PyPI is part of
    the test environment."""
    from soit.data.nuclei import prepare_nuclei

    return prepare_nuclei(str(tmp_path_factory.getbasetemp() / "nuclei"), cache_dir=nuclei_wheel_cache)
