"""Fixtures for the store's tests: every store test runs on SQLite (a file in tmp_path) and on PostgreSQL."""

from __future__ import annotations

import pytest
from store_fixtures import database_url

from qdemo.store import StoreSettings, open_store

BACKENDS = ["sqlite", "postgresql"]


@pytest.fixture(params=BACKENDS)
def url(request, tmp_path):
    """An empty database: a SQLite file in tmp_path, or a new database on the test PostgreSQL server."""
    with database_url(request.param, tmp_path) as found:
        yield found


@pytest.fixture
def store(url):
    opened = open_store(StoreSettings(url=url))
    yield opened
    opened.close()
