"""The one admission every model request passes: rate limits per session and per address, model names (only
what models.yaml lists, only what is ready unless downloads are allowed), settings, readable refusals without
server paths."""

from __future__ import annotations

import pytest

from qdemo.models.registry import load_registry
from qdemo.services.admission import ModelRequest, Refused, Services, without_paths
from qdemo.serving.limits import Client, Limits, RateLimiter, client_from_headers
from qdemo.serving.pool import MemoryBudgetError, ModelPool
from tests.conftest import write_registry

HUB_ENTRY = """
  - name: big-hub-model
    family: qwen2
    source: {hub: {repo_id: qdemo-test/never-cached}}
    max_context: 4096
"""


@pytest.fixture
def registry(tiny_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-hub"))
    path = write_registry(tmp_path / "models.yaml", tiny_dir)
    path.write_text(path.read_text(encoding="utf-8") + HUB_ENTRY, encoding="utf-8")
    return load_registry(path)


def services(registry, **kw) -> Services:
    limits = kw.pop("limits", Limits(requests_per_minute=1000))
    return Services(registry=registry, pool=ModelPool(registry, "cpu", budget_bytes=1 << 30),
                    default_model=registry.default, limits=limits, **kw)


def test_a_client_minting_new_sessions_is_still_limited_by_its_address():
    now = [0.0]
    limiter = RateLimiter(2, per_address=3, clock=lambda: now[0])
    assert limiter.check(Client("s1", "10.0.0.1")) is None and limiter.check(Client("s2", "10.0.0.1")) is None
    assert limiter.check(Client("s3", "10.0.0.1")) is None
    refusal = limiter.check(Client("s4", "10.0.0.1"))  # a fresh session id every call does not help
    assert refusal and "3 per minute per address" in refusal
    assert limiter.check(Client("s5", "10.0.0.2")) is None  # another address is not affected
    assert limiter.check(Client("s5", "10.0.0.2")) is None
    assert "2 per minute per session" in limiter.check(Client("s5", "10.0.0.3"))
    now[0] = 61.0
    assert limiter.check(Client("s4", "10.0.0.1")) is None


def test_a_refused_request_is_not_counted():
    limiter = RateLimiter(1, per_address=5, clock=lambda: 0.0)
    assert limiter.check(Client("a", "ip")) is None
    for _ in range(10):
        assert limiter.check(Client("a", "ip"))  # refused by the session window…
    assert limiter.check(Client("b", "ip")) is None  # …and the address window did not fill up with refusals


def test_the_address_behind_trusted_proxies():
    # No trusted proxy: the socket peer, whatever the client writes into X-Forwarded-For.
    assert client_from_headers("s", "10.0.0.9", "1.2.3.4", 0).address == "10.0.0.9"
    # One trusted proxy appends the address it saw: the last entry; the client's own entries are ignored.
    assert client_from_headers("s", "10.0.0.9", "6.6.6.6, 203.0.113.7", 1).address == "203.0.113.7"
    assert client_from_headers("s", "10.0.0.9", "6.6.6.6, 203.0.113.7, 10.0.0.2", 2).address == "203.0.113.7"
    assert client_from_headers("s", "10.0.0.9", None, 1).address == "10.0.0.9"


def test_models_not_ready_here_are_refused_unless_downloads_are_allowed(registry, monkeypatch):
    loads = []
    strict = services(registry)
    monkeypatch.setattr(strict.pool, "get", lambda *a, **k: loads.append(a))
    with pytest.raises(Refused, match=r"big-hub-model is not available on this server: .*--allow-downloads"):
        with strict.admit("c", ModelRequest("big-hub-model")):
            pass
    assert loads == []  # refused before the pool, so before any download


def test_a_download_that_could_never_fit_is_refused_before_it_starts(registry, monkeypatch):
    import qdemo.models.sources as sources
    import qdemo.serving.pool as pool_module

    monkeypatch.setattr(pool_module, "hub_weight_bytes", lambda spec: 30 * 1024 ** 3)  # the hub's file list

    def no_download(*args, **kwargs):
        raise AssertionError("a download started")

    monkeypatch.setattr(sources, "_resolve_hub", no_download)
    pool = ModelPool(registry, "cpu", budget_bytes=8 * 1024 ** 3)
    with pytest.raises(MemoryBudgetError, match="big-hub-model needs about .* budget is 8.00 GiB.*not downloaded"):
        pool.get("big-hub-model")
    allowing = Services(registry=registry, pool=pool, default_model=registry.default,
                        limits=Limits(requests_per_minute=1000), allow_downloads=True)
    with pytest.raises(Refused, match="Could not load big-hub-model: .*not downloaded"):
        with allowing.admit("c", ModelRequest("big-hub-model")):
            pass


def test_names_and_settings_are_refused_readably(registry):
    s = services(registry)
    with pytest.raises(Refused, match="unknown model 'x{58}…; this server has"):
        s.model_name("x" * 100_000)
    with pytest.raises(Refused, match="model must be a model name"):
        s.model_name(["a"])
    with pytest.raises(Refused, match="temperature must be a finite number, got an integer of 401 digits"):
        s.params(registry.default, {"temperature": 10 ** 400})
    with pytest.raises(Refused, match="top_k must be in"):
        s.params(registry.default, {"top_k": 10 ** 400})
    with pytest.raises(Refused, match="settings must be a JSON object"):
        s.params(registry.default, [1])


def test_the_rate_limit_is_checked_before_any_model_loads(registry, monkeypatch):
    s = services(registry, limits=Limits(requests_per_minute=1))
    loads = []
    monkeypatch.setattr(s.pool, "lease", lambda *a, **k: loads.append(a))
    s.check_rate(Client("c", "ip"))
    with pytest.raises(Refused, match="Too many requests"):
        with s.admit(Client("c", "ip"), ModelRequest(None)):
            pass
    assert loads == []


def test_messages_for_the_page_carry_no_server_paths():
    text = ("model x: Qwen/Qwen2.5-7B-Instruct@main is not in the Hugging Face cache (/home/me/.cache/hf/hub) "
            "and /srv/qdemo/models/x-1/config.json is missing")
    cleaned = without_paths(text)
    assert "/home" not in cleaned and "/srv" not in cleaned and "Qwen/Qwen2.5-7B-Instruct@main" in cleaned
