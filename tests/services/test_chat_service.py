"""The chat service behind the Chat tab: input handling, the two steps of a turn, Stop and Clear at any moment,
fresh seeds, end notes, export/import. No Gradio: these are the functions the tab wires."""

from __future__ import annotations

import json
import re
import threading
import time

import pytest

from qdemo.core.engine import collect, generate
from qdemo.models.loader import load_model
from qdemo.models.registry import load_registry
from qdemo.sampling import SamplingParams
from qdemo.services import chat
from qdemo.services.admission import Refused, Services
from qdemo.serving.limits import Limits
from qdemo.serving.pool import ModelPool
from qdemo.views.answer import END_MARK
from tests.conftest import write_registry


@pytest.fixture(scope="module")
def services(tiny_dir, cycle_dir, tmp_path_factory):
    registry = load_registry(write_registry(tmp_path_factory.mktemp("chat") / "models.yaml", tiny_dir,
                                            max_context=8192, cycle_dir=cycle_dir))
    return Services(registry=registry, pool=ModelPool(registry, "cpu"), default_model=registry.default,
                    limits=Limits(requests_per_minute=10_000))


def test_empty_and_long_input():
    assert chat.prepare_turn("  \n ", [], None) is None
    assert chat.prepare_turn(None, [], None) is None
    turn = chat.prepare_turn("字" * 50, [], "sys", Limits(max_input_chars=10))
    assert turn.messages[-1]["content"] == "字" * 10 and "50" in turn.notice and "10" in turn.notice
    assert turn.messages[0] == {"role": "system", "content": "sys"}


def test_history_parts_are_flattened_and_bad_parts_named():
    history = [{"role": "user", "content": [{"type": "text", "text": "你好"}]},
               {"role": "assistant", "content": "hi"}]
    turn = chat.prepare_turn("next", history, "")
    assert turn.messages == [{"role": "user", "content": "你好"}, {"role": "assistant", "content": "hi"},
                             {"role": "user", "content": "next"}]
    with pytest.raises(ValueError, match="history message 0 content part 0 must be text, got int"):
        chat.prepare_turn("next", [{"role": "user", "content": [{"type": "text", "text": 5}]}], None)


def test_other_roles_are_left_out_with_a_notice_or_refused_from_the_api():
    history = [{"role": "user", "content": "hi"}, {"role": "tool", "content": "ran"}, "junk"]
    turn = chat.prepare_turn("next", history, None)
    assert [m["content"] for m in turn.messages] == ["hi", "next"] and "2 message(s)" in turn.notice
    with pytest.raises(ValueError, match="history message 1 has role 'tool'"):
        chat.prepare_turn("next", history, None, strict=True)


def test_end_notes_never_reach_the_model():
    history = [{"role": "user", "content": "q"},
               {"role": "assistant", "content": "half an answer\n\n" + END_MARK + "*⏹ stopped by you after 3*"}]
    turn = chat.prepare_turn("go on", history, None)
    assert turn.messages[1] == {"role": "assistant", "content": "half an answer"}


def test_export_import_round_trip_keeps_settings():
    messages = [{"role": "user", "content": "写一首诗 🌸"}, {"role": "assistant", "content": "春眠不觉晓"}]
    text = chat.export_conversation("tiny-qwen2", "be nice", messages, {"seed": 3, "temperature": 0.3})
    assert "写一首诗 🌸" in text  # readable UTF-8, not \u escapes
    data = chat.import_conversation(text)
    assert data.messages == messages and data.system == "be nice" and data.model == "tiny-qwen2"
    assert data.settings == {"seed": 3, "temperature": 0.3}


@pytest.mark.parametrize("text,match", [
    ("{not json", "not a JSON file"),
    ("[1, 2]", "not a qdemo conversation"),
    (json.dumps({"messages": [{"role": "wizard", "content": "x"}]}), "role"),
    (json.dumps({"messages": [{"role": "system", "content": "x"}, {"role": "user", "content": "y"}]}), "system"),
    (json.dumps({"messages": [], "settings": [1]}), "settings"),
])
def test_bad_imports_are_explained(text, match):
    with pytest.raises(ValueError, match=match):
        chat.import_conversation(text)


def _answer(services, session, history, params, **kw):
    return list(chat.answer(services, session, "test-client", history, services.default_model, "", params, 1, **kw))


def test_a_turn_is_two_steps_and_records_the_run(services, tiny_lm):
    session = chat.ChatSession()
    begun = chat.begin_turn(session, "hello 你好", [], services.limits)
    assert begun.started and begun.chat == [{"role": "user", "content": "hello 你好"}]
    assert session.pending == begun.ticket
    params = SamplingParams(do_sample=True, temperature=0.9, seed=5, max_new_tokens=6)
    updates = _answer(services, session, begun.chat, params)
    final = updates[-1]
    assert final.done and final.view.run is final.run and session.view is final.view
    assert session.pending is None and session.running is None
    run = final.view.run
    expected = collect(generate(tiny_lm, messages=[{"role": "system", "content": "You are a tiny test model."},
                                                   {"role": "user", "content": "hello 你好"}], params=params))
    assert [t.token_id for t in run.tokens] == [t.token_id for t in expected["tokens"]]
    bubbles = [m["content"] for m in final.chat if m["role"] == "assistant" and not m["content"].startswith(END_MARK)]
    assert bubbles == [run.done.text]  # the answer's bubble; a cut answer's note follows in one of its own
    assert final.view.texts == [tiny_lm.tokenizer.decode([t.token_id]) for t in run.tokens]
    assert [i for i, _, _ in final.view.prompt] == list(run.prefill.prompt_ids)
    assert any(special for _, _, special in final.view.prompt)
    # nothing armed: a second answer() does nothing
    assert _answer(services, session, begun.chat, params) == []


def test_empty_message_is_ignored_visibly(services):
    session = chat.ChatSession()
    begun = chat.begin_turn(session, "   ", [], services.limits)
    assert not begun.started and "Empty message ignored" in begun.notice and not session.pending
    nothing = chat.begin_regenerate(session, [])
    assert not nothing.started and "Nothing to regenerate" in nothing.notice


def test_a_new_message_waits_for_the_running_answer_unless_stopped(services):
    """A second Send while an answer is written would lose a message (both answers snapshot the chat): it is
    refused with a notice, and taken once Stop was pressed; the replaced answer then writes nothing more."""
    session = chat.ChatSession()
    first = chat.begin_turn(session, "one", [], services.limits)
    stream = chat.answer(services, session, "c", first.chat, "cycle", "", SamplingParams(max_new_tokens=500), 1,
                         ticket=first.ticket)
    next(stream)
    second = chat.begin_turn(session, "two", first.chat, services.limits)
    assert not second.started and "still being written" in second.notice
    session.stop.set()
    second = chat.begin_turn(session, "two", first.chat, services.limits)
    assert second.started and second.ticket == first.ticket + 1
    assert list(stream) == []  # the first answer was replaced: nothing of it lands on the chat
    final = list(chat.answer(services, session, "c", second.chat, "cycle", "", SamplingParams(max_new_tokens=4), 2,
                             ticket=second.ticket))[-1]
    assert [m["content"] for m in final.chat if m["role"] == "user"] == ["one", "two"]
    assert final.view.run.done.reason == "max_tokens"


def test_stop_pressed_before_the_answer_starts_is_honoured(services):
    """Bug: Stop during the model load was ignored (the flag was reset when generation began)."""
    session = chat.ChatSession()
    begun = chat.begin_turn(session, "tell me a long story", [], services.limits)
    session.stop.set()  # pressed while the request waits in the queue or the model loads
    updates = _answer(services, session, begun.chat, SamplingParams(max_new_tokens=200))
    assert len(updates) == 1 and updates[0].done and updates[0].view is None
    assert "Stopped before the answer started" in updates[0].chat[-1]["content"]


def test_clear_while_streaming_leaves_nothing_behind(services):
    """Bug: pressing Clear mid-answer brought the whole conversation back when the answer ended."""
    session = chat.ChatSession()
    history = [{"role": "user", "content": "earlier"}, {"role": "assistant", "content": "turn"}]
    begun = chat.begin_turn(session, "a long story", history, services.limits)
    stream = chat.answer(services, session, "c", begun.chat, services.default_model, "",
                         SamplingParams(max_new_tokens=200), 1)
    first = next(stream)
    assert first.chat[0]["content"] == "earlier"
    session.interrupt()  # Clear
    rest = list(stream)
    assert rest == [] and session.stop.is_set() and session.view is None


def test_regenerate_draws_a_fresh_seed_unless_pinned(services):
    """Bug: Regenerate in sample mode repeated the identical answer (the seed box defaulted to 1234)."""
    session = chat.ChatSession()
    history = [{"role": "user", "content": "hello"}]
    params = SamplingParams(do_sample=True, temperature=1.0, max_new_tokens=12)  # no seed: the default now
    seeds, texts = [], []
    for _ in range(2):
        begun = chat.begin_regenerate(session, history + [{"role": "assistant", "content": "x"}])
        assert begun.chat == history
        final = _answer(services, session, begun.chat, params)[-1]
        seeds.append(final.view.run.prefill.seed)
        texts.append(final.view.run.done.token_ids)
        assert f"seed {seeds[-1]}" in final.metrics
    assert seeds[0] != seeds[1]  # (their answers may still agree by chance; the pinned seed below must)
    chat.begin_regenerate(session, history)
    pinned = _answer(services, session, history, params.replace(seed=seeds[0]))[-1]
    assert pinned.view.run.done.token_ids == texts[0]


def test_length_limit_and_stop_are_marked_in_the_bubble(services):
    session = chat.ChatSession()
    begun = chat.begin_turn(session, "count", [], services.limits)
    final = list(chat.answer(services, session, "c", begun.chat, "cycle", "", SamplingParams(max_new_tokens=7),
                             1))[-1]
    assert final.view.run.done.reason == "max_tokens" and final.view.run.done.text == "The quick brown fox\n"
    assert "length limit" in final.chat[-1]["content"] and "length limit" in final.metrics
    # the note is for people: the next turn sends the answer as the model wrote it
    assert chat.prepare_turn("more", final.chat, None).messages[-2]["content"] == "The quick brown fox\n"
    session.arm()
    stopper = chat.answer(services, session, "c", begun.chat, "cycle", "", SamplingParams(max_new_tokens=2000), 2)
    next(stopper)
    session.stop.set()
    last = list(stopper)[-1]
    assert last.view.run.done.reason == "stopped" and "Stopped by you" in last.chat[-1]["content"]
    assert len(last.view.run.tokens) < 50


def test_a_prompt_too_long_is_a_notice_not_a_crash(services):
    session = chat.ChatSession()
    begun = chat.begin_turn(session, "字" * 15_000, [], services.limits)  # ≈ 45,000 byte-level tokens
    (update,) = _answer(services, session, begun.chat, SamplingParams(max_new_tokens=100))
    assert update.done and "prompt tokens" in update.notice and update.chat == begun.chat


def test_refusals_land_in_the_notice(services):
    session = chat.ChatSession()
    begun = chat.begin_turn(session, "hi", [], services.limits)
    (update,) = list(chat.answer(services, session, "c", begun.chat, "no-such-model", "", SamplingParams(), 1))
    assert update.done and "unknown model 'no-such-model'" in update.notice


def test_sessions_are_independent_copies():
    import copy

    a = chat.ChatSession()
    b = copy.deepcopy(a)
    assert b.key != a.key  # each session keeps its own decode state in the pool
    assert (a.arm(), b.arm()) == (1, 1)
    a.stop.set()
    assert not b.stop.is_set() and b.busy() == "Your last message is still waiting for the model: wait for it, " \
                                               "or press Stop."
    b.stop.set()  # b's own Stop works, and frees it for a new turn
    assert b.stop.is_set() and b.busy() == ""


def test_beam_metrics_show_progress_and_the_kv_cache(services, monkeypatch):
    """Bug: beam runs said "KV 0 B" in the metrics strip."""
    monkeypatch.setattr(chat, "UI_INTERVAL_S", 0.0)  # every update, however fast the tiny model is
    session = chat.ChatSession()
    begun = chat.begin_turn(session, "hello", [], services.limits)
    updates = _answer(services, session, begun.chat, SamplingParams(num_beams=3, max_new_tokens=8))
    final = updates[-1]
    assert "KV 0 B" not in final.metrics and final.view.run.tokens[0].kv_cache_bytes > 0
    assert "Beam search shows its best beam so far" in final.notice
    during = [u for u in updates if not u.done]
    assert any("beam search" in u.metrics and "step" in u.metrics for u in during)


def test_the_whole_prompt_is_capped_history_included(tiny_dir, cycle_dir, tmp_path):
    """--max-input-chars cuts only the new message; --max-prompt-tokens caps the whole prompt: older turns go
    first, and a newest message that alone is too long is refused naming the limit."""
    registry = load_registry(write_registry(tmp_path / "models.yaml", tiny_dir, max_context=8192, cycle_dir=cycle_dir))
    capped = Services(registry=registry, pool=ModelPool(registry, "cpu"), default_model=registry.default,
                      limits=Limits(max_prompt_tokens=120, requests_per_minute=1000))
    history = []
    for i in range(6):
        history += [{"role": "user", "content": f"question {i} " * 5}, {"role": "assistant", "content": f"answer {i}"}]
    session = chat.ChatSession()
    begun = chat.begin_turn(session, "and now?", history, capped.limits)
    final = _answer(capped, session, begun.chat, SamplingParams(max_new_tokens=4))[-1]
    prefill = final.view.run.prefill
    assert len(prefill.prompt_ids) <= 120 and prefill.dropped_turns[:2] == (0, 1)
    assert "dropped" in final.metrics and final.view.dropped[0] == ("user", "question 0 " * 5)
    session = chat.ChatSession()
    begun = chat.begin_turn(session, "word " * 300, [], capped.limits)
    (refused,) = _answer(capped, session, begun.chat, SamplingParams(max_new_tokens=4))
    assert "this server's prompt limit" in refused.notice and "120" in refused.notice


def test_an_answer_is_cut_at_the_time_limit_with_a_note(tiny_dir, cycle_dir, tmp_path):
    registry = load_registry(write_registry(tmp_path / "models.yaml", tiny_dir, max_context=8192, cycle_dir=cycle_dir))
    timed = Services(registry=registry, pool=ModelPool(registry, "cpu"), default_model="cycle",
                     limits=Limits(max_generation_seconds=1, requests_per_minute=1000, max_new_tokens=8000))
    session = chat.ChatSession()
    begun = chat.begin_turn(session, "go", [], timed.limits)
    final = list(chat.answer(timed, session, "c", begun.chat, "cycle", "", SamplingParams(max_new_tokens=8000),
                             1))[-1]
    assert final.view.run.done.reason == "time_limit" and 0 < len(final.view.run.tokens) < 8000
    assert "time limit" in final.chat[-1]["content"] and "time limit" in final.metrics


def test_the_next_turn_reuses_the_kept_state_and_says_so(services, tiny_lm):
    session = chat.ChatSession()
    params = SamplingParams(do_sample=True, temperature=0.9, seed=4, max_new_tokens=8)
    begun = chat.begin_turn(session, "hello 你好", [], services.limits)
    first = _answer(services, session, begun.chat, params)[-1]
    assert services.states.models().get(session.key) == services.default_model
    begun = chat.begin_turn(session, "and then?", first.chat, services.limits)
    second = _answer(services, session, begun.chat, params)[-1]
    prefill = second.view.run.prefill
    assert prefill.reused_tokens >= len(first.view.run.prefill.prompt_ids)
    assert f"reused {prefill.reused_tokens:,} of {len(prefill.prompt_ids):,} prompt tokens" in second.metrics
    fresh = collect(generate(tiny_lm, input_ids=list(prefill.prompt_ids), params=params))
    assert second.view.run.done.token_ids == fresh["done"].token_ids  # the oracle: a full re-prefill
    services.states.drop(key=session.key)
    assert session.key not in services.states.models()


def test_an_api_turn_records_the_run_the_page_would(services):
    """/chat and /decisions go through the page answer's own steps: the same prompt, admission and events give the
    same tokens under the same settings; the record is one run growing with each event."""
    params = services.registry.get(services.default_model).sampling.replace(do_sample=False, max_new_tokens=5)
    runs = list(chat.api_turn(services, "api-client", "hello 你好", [], "", {"do_sample": False,
                                                                             "max_new_tokens": 5}, None))
    final = runs[-1]
    assert all(run is final for run in runs) and len(runs) == len(final.tokens) + 2  # prefill, tokens, done
    session = chat.ChatSession()
    begun = chat.begin_turn(session, "hello 你好", [], services.limits)
    page = _answer(services, session, begun.chat, params)[-1].view.run
    assert final.done.token_ids == page.done.token_ids and final.settings == page.settings
    assert (final.label, final.run_id, page.label) == ("api", 0, "chat")
    assert chat.api_answer(services, "api-client", "hello 你好", None, "", {"do_sample": False,
                                                                            "max_new_tokens": 5},
                           None).done.token_ids == page.done.token_ids


@pytest.mark.parametrize("message,history,system,match", [
    ("hi", "not a list", None, "history must be a list of {role, content} messages, got str"),
    ("hi", [], 5, "system must be text, got int"),
    ("  \n", [], None, "message is empty"),
    ("hi", [{"role": "tool", "content": "x"}], None, "history message 0 has role 'tool'"),
])
def test_an_api_turn_names_the_field_it_refuses(services, message, history, system, match):
    with pytest.raises((Refused, ValueError), match=re.escape(match)):  # both name the field
        list(chat.api_turn(services, "api-client", message, history, "", None, system))


# --- issue 19: controls that always answer, notes outside the answer -------------------------------------------

def test_clear_waits_for_the_update_on_its_way_and_nothing_follows_it(services):
    """Item 1: an update the answer had handed to the page before Clear could reach the page after Clear's reset.
    Clear now waits until the page has taken the update in flight (it asks for the next one), and the stale answer
    yields nothing more."""
    session = chat.ChatSession()
    assert session.settle(0.0)  # nothing in flight: Clear need not wait
    begun = chat.begin_turn(session, "a long story", [], services.limits)
    stream = chat.answer(services, session, "c", begun.chat, "cycle", "", SamplingParams(max_new_tokens=2000), 1)
    next(stream)  # handed to the page, which has not asked for the next update yet
    session.interrupt()
    settled = threading.Event()
    waiter = threading.Thread(target=lambda: session.settle(30) and settled.set())
    waiter.start()
    assert not settled.wait(0.3), "Clear's reset went out while an update of the answer was still on its way"
    assert list(stream) == []  # the page takes it and asks for more: the cleared answer ends without a word
    waiter.join(30)
    assert settled.is_set()


def _eventually(check, what: str, seconds: float = 30.0) -> None:
    """Poll `check()` until it holds (a generous bound: background work with no event to wait on)."""
    deadline = time.monotonic() + seconds
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def _answer_while_loading(tiny_dir, cycle_dir, tmp_path, loader):
    """Services whose cycle model loads through `loader`, and an answer on a thread of its own that waits for it:
    (services, the chat session, the progress reports seen, the updates, the thread)."""
    registry = load_registry(write_registry(tmp_path / "models.yaml", tiny_dir, max_context=8192, cycle_dir=cycle_dir))
    slow = Services(registry=registry, pool=ModelPool(registry, "cpu", loader=loader), default_model="cycle",
                    limits=Limits(requests_per_minute=1000))
    session, seen, updates = chat.ChatSession(), [], []
    begun = chat.begin_turn(session, "a story", [], slow.limits)
    stream = chat.answer(slow, session, "c", begun.chat, "cycle", "", SamplingParams(max_new_tokens=50), 1,
                         progress=lambda *report: seen.append(report))
    worker = threading.Thread(target=lambda: updates.extend(stream))
    worker.start()
    return slow, session, seen, updates, worker


def test_stop_while_the_model_loads_ends_the_answer_at_once(tiny_dir, cycle_dir, tmp_path):
    """Item 3: Stop during the first load showed only when the load ended. The answer now ends as soon as Stop is
    pressed, while the load is still held; the load finishes in the background, so the next message finds the
    model loaded (one load in all), and its progress stops reaching the ended answer's bar."""
    held, reached, loads = threading.Event(), threading.Event(), []

    def loader(spec, **kw):
        loads.append(spec.name)
        kw["progress"]("held", 0, 1)
        reached.set()
        assert held.wait(60)
        return load_model(spec, **kw)

    slow, session, seen, updates, worker = _answer_while_loading(tiny_dir, cycle_dir, tmp_path, loader)
    assert reached.wait(60)
    session.stop.set()
    worker.join(10)
    try:
        assert not worker.is_alive(), "the stopped answer waited for the load"
        assert [u.done for u in updates] == [True] and updates[0].view is None
        assert "Stopped before the answer started" in updates[0].chat[-1]["content"]
        assert ("held", 0, 1) in seen
    finally:
        held.set()
    _eventually(lambda: any(k.startswith("cycle") for k in slow.pool.loaded()), "the background load")
    reported = list(seen)
    begun = chat.begin_turn(session, "again", [], slow.limits)
    final = list(chat.answer(slow, session, "c", begun.chat, "cycle", "", SamplingParams(max_new_tokens=4), 2))[-1]
    assert final.view.run.done.reason == "max_tokens" and loads == ["cycle"]
    assert seen == reported  # the background load's own reports never reached the ended answer


def test_a_load_reports_nothing_to_an_answer_that_clear_made_stale(tiny_dir, cycle_dir, tmp_path):
    """CI: Clear during the first load left "load weights 100%" on the emptied chat. The load went on (for the next
    message) and its next report reached the cleared answer's bar after Clear's reset. A report made once the answer
    is stale is now dropped, and the answer writes nothing."""
    reached, cleared, reported_after = threading.Event(), threading.Event(), threading.Event()

    def loader(spec, **kw):
        kw["progress"]("before", 0, 1)
        reached.set()
        assert cleared.wait(60)
        kw["progress"]("after", 0, 1)  # at once: before the answer's next look at its stop event
        reported_after.set()
        return load_model(spec, **kw)

    slow, session, seen, updates, worker = _answer_while_loading(tiny_dir, cycle_dir, tmp_path, loader)
    assert reached.wait(60)
    session.interrupt()
    cleared.set()
    assert reported_after.wait(60)
    worker.join(30)
    assert not worker.is_alive() and updates == []
    assert seen == [("before", 0, 1)]
    _eventually(lambda: any(k.startswith("cycle") for k in slow.pool.loaded()), "the background load")


def test_end_notes_are_plain_words_in_a_bubble_of_their_own(services):
    """Item 11: "*⏹ stopped…*" showed its asterisks, ⏹ drew as a blank box, and an answer cut inside a code fence
    carried its note inside the code block. The answer's bubble now holds the answer alone; the note is a bubble of
    its own, in plain words, and never reaches the model."""
    session = chat.ChatSession()
    begun = chat.begin_turn(session, "count", [], services.limits)
    final = list(chat.answer(services, session, "c", begun.chat, "cycle", "", SamplingParams(max_new_tokens=7),
                             1))[-1]
    answer, note = final.chat[-2:]
    assert answer == {"role": "assistant", "content": final.view.run.done.text}
    words = note["content"].replace(END_MARK, "")
    assert note["role"] == "assistant" and "length limit" in words and words.isascii()
    assert not re.search(r"[*_`#]", words)  # nothing Markdown would read as markup
    sent = chat.prepare_turn("more", final.chat, None).messages
    assert sent == [{"role": "user", "content": "count"}, {"role": "assistant", "content": final.view.run.done.text},
                    {"role": "user", "content": "more"}]


def test_a_prompt_cut_to_fit_says_so_in_the_notice(tiny_dir, cycle_dir, tmp_path):
    """Done means: a conversation cut to fit the context (40 turns → a prompt of the model's size, the oldest
    messages left out) says so in the chat's notice line, not only in the metrics line."""
    registry = load_registry(write_registry(tmp_path / "models.yaml", tiny_dir, max_context=512, cycle_dir=cycle_dir))
    small = Services(registry=registry, pool=ModelPool(registry, "cpu"), default_model="cycle",
                     limits=Limits(requests_per_minute=1000))
    history = []
    for i in range(40):
        history += [{"role": "user", "content": f"question {i}"}, {"role": "assistant", "content": f"answer {i}"}]
    session = chat.ChatSession()
    begun = chat.begin_turn(session, "and now?", history, small.limits)
    final = _answer(small, session, begun.chat, SamplingParams(max_new_tokens=4))[-1]
    prefill = final.view.run.prefill
    left_out = len(prefill.dropped_turns)
    assert left_out > 0 and f"dropped {left_out} old message(s)" in final.metrics
    assert f"{left_out} oldest message(s) were left out" in final.notice
    assert f"{len(prefill.prompt_ids):,} tokens" in final.notice


def test_a_send_the_server_takes_after_a_later_clear_or_stop_keeps_the_page_order(services):
    """Item 1 (and 2): the page numbers its chat actions in the order they were made; two requests can still reach
    the server the other way round. A Send made before a Clear the server already took arms nothing (the chat
    stays cleared); a Send made before a Stop the server already took is stopped before it starts. A Stop made
    before the Send of the running turn leaves that turn alone."""
    session = chat.ChatSession()
    session.interrupt(action=5)  # Clear, the page's 5th action
    late = chat.begin_turn(session, "made before the Clear", [{"role": "user", "content": "old"}], services.limits,
                           action=4)
    assert late.stale and not late.started and session.pending is None
    session.stop_turn(action=8)  # Stop, the 8th, reached the server before …
    begun = chat.begin_turn(session, "the 7th", [], services.limits, action=7)  # … the Send made before it
    assert begun.started and not begun.stale and session.stop.is_set()
    (update,) = _answer(services, session, begun.chat, SamplingParams(max_new_tokens=50))
    assert "Stopped before the answer started" in update.chat[-1]["content"]
    newer = chat.begin_turn(session, "the 10th", [], services.limits, action=10)
    session.stop_turn(action=9)  # a Stop made before this Send: not for this turn
    assert newer.started and not session.stop.is_set()
    session.stop_turn(action=11)
    assert session.stop.is_set()
