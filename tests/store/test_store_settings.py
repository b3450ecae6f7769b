"""StoreSettings: where the store goes and whether it is on, read strictly from the environment."""

from __future__ import annotations

from pathlib import Path

import pytest

from qdemo.store import StoreSettings
from qdemo.store import location
from qdemo.store.location import default_data_dir


def test_an_empty_environment_means_on_with_no_retention_in_the_user_data_dir(monkeypatch, tmp_path):
    monkeypatch.setattr(location, "platformdirs", None)
    settings = StoreSettings.from_env({"XDG_DATA_HOME": str(tmp_path)})
    assert settings == StoreSettings(url=None, data_dir=tmp_path / "qdemo", enabled=True, keep_days=None,
                                     keep_rows=None)
    assert settings.database_url() == f"sqlite:///{tmp_path}/qdemo/qdemo.sqlite"


def test_qdemo_data_wins_over_the_space_and_a_url_wins_over_the_file(tmp_path):
    space = {"SPACE_ID": "user/qdemo", "QDEMO_DATA": str(tmp_path / "mine")}
    assert StoreSettings.from_env(space).data_dir == tmp_path / "mine"
    settings = StoreSettings.from_env({**space, "QDEMO_STORE_URL": "postgresql://u:pw@db.example:5432/qdemo"})
    assert settings.database_url() == "postgresql+psycopg://u:pw@db.example:5432/qdemo"


def test_a_space_keeps_the_store_in_data_when_it_is_mounted_and_writable(monkeypatch, tmp_path):
    monkeypatch.setattr(location, "platformdirs", None)
    home = {"XDG_DATA_HOME": str(tmp_path / "xdg")}
    assert default_data_dir({**home, "SPACE_ID": "user/qdemo"}, space_data=tmp_path) == tmp_path
    assert default_data_dir(home, space_data=tmp_path) == tmp_path / "xdg" / "qdemo"  # not a Space
    assert default_data_dir({**home, "SPACE_ID": "user/qdemo"}, space_data=tmp_path / "absent") == \
        tmp_path / "xdg" / "qdemo"  # a Space without persistent storage
    (tmp_path / "file").write_text("")
    assert default_data_dir({**home, "SPACE_ID": "user/qdemo"}, space_data=tmp_path / "file") == \
        tmp_path / "xdg" / "qdemo"
    monkeypatch.setattr(location, "SPACE_DATA", tmp_path)
    assert StoreSettings.from_env({**home, "SPACE_ID": "user/qdemo"}).data_dir == tmp_path


def test_a_relative_xdg_data_home_is_ignored_as_the_spec_says(monkeypatch, tmp_path):
    monkeypatch.setattr(location, "platformdirs", None)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert default_data_dir({"XDG_DATA_HOME": "relative/dir"}) == tmp_path / ".local" / "share" / "qdemo"


@pytest.mark.parametrize("value, expected", [("on", True), ("off", False), ("", True)])
def test_qdemo_store_is_on_or_off(value, expected):
    assert StoreSettings.from_env({"QDEMO_STORE": value}).enabled is expected


@pytest.mark.parametrize("name, value", [
    ("QDEMO_STORE", "yes"), ("QDEMO_STORE", "OFF"), ("QDEMO_STORE", "0"), ("QDEMO_STORE", " on"),
    ("QDEMO_STORE_KEEP_DAYS", "abc"), ("QDEMO_STORE_KEEP_DAYS", "-1"), ("QDEMO_STORE_KEEP_DAYS", "0"),
    ("QDEMO_STORE_KEEP_DAYS", "nan"), ("QDEMO_STORE_KEEP_DAYS", "inf"), ("QDEMO_STORE_KEEP_DAYS", "1e3"),
    ("QDEMO_STORE_KEEP_ROWS", "1.5"), ("QDEMO_STORE_KEEP_ROWS", "0"), ("QDEMO_STORE_KEEP_ROWS", "1_000"),
    ("QDEMO_STORE_KEEP_ROWS", "ten"), ("QDEMO_STORE_URL", "not a url"),
])
def test_a_malformed_variable_is_refused_by_name(name, value):
    with pytest.raises(ValueError, match=name) as caught:
        StoreSettings.from_env({name: value})
    assert repr(value) in str(caught.value)


def test_a_huge_value_is_quoted_cut_to_40_characters():
    with pytest.raises(ValueError) as caught:
        StoreSettings.from_env({"QDEMO_STORE": "x" * 100_000})
    message = str(caught.value)
    assert "QDEMO_STORE" in message and repr("x" * 40) + "…" in message and len(message) < 120


def test_retention_numbers_are_read():
    settings = StoreSettings.from_env({"QDEMO_STORE_KEEP_DAYS": "7.5", "QDEMO_STORE_KEEP_ROWS": "1000"})
    assert (settings.keep_days, settings.keep_rows) == (7.5, 1000)


@pytest.mark.parametrize("fields, named", [
    ({"enabled": "yes"}, "enabled"), ({"keep_days": 0}, "keep_days"), ({"keep_days": float("nan")}, "keep_days"),
    ({"keep_rows": 0}, "keep_rows"), ({"keep_rows": True}, "keep_rows"), ({"url": ""}, "URL"),
    ({"data_dir": 3}, "data_dir"),
])
def test_settings_built_in_code_are_checked_too(fields, named):
    with pytest.raises(ValueError, match=named):
        StoreSettings(**fields)


def test_settings_are_frozen(tmp_path):
    settings = StoreSettings(data_dir=str(tmp_path))
    assert settings.data_dir == Path(tmp_path)
    with pytest.raises(AttributeError):
        settings.enabled = False
