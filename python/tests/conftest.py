import pytest

import kvstore


@pytest.fixture
def store():
    s = kvstore.Store("64MiB")
    yield s
    s.close()
