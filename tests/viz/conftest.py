"""One tiny trained run shared by the viz tests (trained once per session, about 3 s)."""
import pytest

from tests.viz._squares import train_squares


@pytest.fixture(scope="session")
def squares_run(tmp_path_factory):
    return train_squares(tmp_path_factory.mktemp("viz_runs"))
