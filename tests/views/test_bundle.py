"""The evidence bundle: one offline HTML file with the run inside, read back exactly, safe against user text."""

from __future__ import annotations

import dataclasses
import json
import platform
import re
from html.parser import HTMLParser

import gradio
import pytest
import torch
import transformers

from qdemo.core.engine import generate
from qdemo.core.runs import RunRecord, run_to_json
from qdemo.sampling import SamplingParams
from qdemo.views.bundle import bundle_html, bundle_meta, read_bundle

FINGERPRINT = "sha256:3f1c0ffee0000000000000000000000000000000000000000000000000000042"
EVIL = "</script><script>alert(1)</script>"
CHINESE = "你好，世界：模型说“是”。"


class Page(HTMLParser):
    """What a browser would see: tags with their attributes, script blocks, style text, visible text."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.scripts: list[tuple[dict[str, str | None], str]] = []
        self.styles: list[str] = []
        self._open: tuple[str, dict[str, str | None]] | None = None
        self.text: list[str] = []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.tags.append((tag, attrs))
        if tag in ("script", "style"):
            self._open = (tag, attrs)

    def handle_endtag(self, tag):
        if self._open and tag == self._open[0]:
            self._open = None

    def handle_data(self, data):
        if self._open and self._open[0] == "script":
            self.scripts.append((self._open[1], data))
        elif self._open and self._open[0] == "style":
            self.styles.append(data)
        else:
            self.text.append(data)


def parse(page: str) -> Page:
    parser = Page()
    parser.feed(page)
    parser.close()
    return parser


@pytest.fixture(scope="module")
def sampled(tiny_lm) -> tuple[RunRecord, dict[int, str]]:
    params = SamplingParams(do_sample=True, temperature=0.9, top_k=8, top_p=0.8, repetition_penalty=1.3,
                            max_new_tokens=12, seed=21)
    run = RunRecord(run_id=7, model="tiny-qwen2", settings=params.to_dict(), label="chat", forward="torch fp32")
    run.extend(generate(tiny_lm, messages=[{"role": "user", "content": "写 hello"}], params=params, top_n=5,
                        ignore_eos=True))
    ids = {t.token_id for t in run.tokens} | {i for t in run.tokens for s in t.stages for i in s.token_ids}
    ids |= set(run.prefill.prompt_ids)
    texts = {i: tiny_lm.tokenizer.decode([i]) for i in ids}
    return run, texts


def evil_run(run: RunRecord) -> RunRecord:
    """The sampled run with an answer (and a token, a label and a setting) that try to break out of the page."""
    tokens = list(run.tokens)
    tokens[0] = dataclasses.replace(tokens[0], text=EVIL)
    tokens[1] = dataclasses.replace(tokens[1], text=CHINESE + "\u2028")
    done = dataclasses.replace(run.done, text=f"{EVIL}\n{CHINESE}<!-- x")
    return dataclasses.replace(run, tokens=tokens, done=done, label="<b>A</b>",
                               settings={**run.settings, "note": "</SCRIPT ><img src=x onerror=alert(2)>"})


def test_round_trip_gives_back_the_same_run(sampled):
    run, texts = sampled
    page = bundle_html(run, FINGERPRINT, texts, title="evidence")
    again = read_bundle(page)
    assert again.to_dict() == run.to_dict()
    assert again == run
    # Plain run JSON reads the same way (the app's import takes either file).
    assert read_bundle(run_to_json(run)).to_dict() == run.to_dict()
    assert read_bundle(page.encode("utf-8")).to_dict() == run.to_dict()


def test_the_page_shows_provenance_settings_metrics_and_text(sampled, tiny_lm):
    run, texts = sampled
    page = bundle_html(run, FINGERPRINT, texts, prompt="写 hello")
    visible = " ".join(parse(page).text)
    for expected in (FINGERPRINT, "tiny-qwen2", "torch fp32", "seed", "21", "top_p", "0.8", "repetition_penalty",
                     "写 hello", "time to first token", "decode", f"{run.done.stats.new_tokens}"):
        assert expected in visible, expected
    assert run.done.text.strip() and run.done.text.strip()[:10] in visible
    # The versions as each library states its own, not as the bundle code reads them.
    stated = {"python": platform.python_version(), "torch": torch.__version__,
              "transformers": transformers.__version__, "gradio": gradio.__version__}
    for name, version in stated.items():
        assert version in visible and name in visible
    meta = bundle_meta(page)
    assert meta["fingerprint"] == FINGERPRINT and meta["prompt"] == "写 hello"
    assert {k: meta["libraries"][k] for k in stated} == stated
    assert {int(k): v for k, v in meta["texts"].items()} == texts


def test_the_prompt_without_its_text_is_decoded_from_the_token_texts(sampled):
    run, texts = sampled
    visible = " ".join(parse(bundle_html(run, FINGERPRINT, texts)).text)
    assert "".join(texts[i] for i in run.prefill.prompt_ids) in visible
    bare = " ".join(parse(bundle_html(run, FINGERPRINT)).text)
    assert " ".join(str(i) for i in run.prefill.prompt_ids) in bare


def test_the_page_is_offline_and_runs_no_script(sampled):
    run, texts = sampled
    page = bundle_html(run, FINGERPRINT, texts)
    parsed = parse(page)
    assert not re.search(r"https?://", page)
    assert not any(tag == "link" or "src" in attrs or "href" in attrs for tag, attrs in parsed.tags)
    assert not any("url(" in css or "@import" in css or "@font-face" in css for css in parsed.styles)
    scripts = [attrs for tag, attrs in parsed.tags if tag == "script"]
    assert [a.get("type") for a in scripts] == ["application/json", "application/json"]
    assert not any(key.startswith("on") for _, attrs in parsed.tags for key in attrs)


def test_hover_holds_every_stage_of_every_token(sampled):
    run, texts = sampled
    page = bundle_html(run, FINGERPRINT, texts)
    tooltips = re.findall(r'<span class="tip" role="tooltip">(.*?)</span></span>(?=<span class="tok|<br>|</div>)',
                          page)
    assert len(tooltips) == len(run.tokens)
    for i, (tip, event) in enumerate(zip(tooltips, run.tokens)):
        assert f"token {i} " in tip
        rows = re.findall(r'<span class="tip-row tip-stage">(.*?)</span>(?=<span class="tip-row|$)', tip)
        assert len(rows) == len(event.stages) >= 4, tip
        for row, stage in zip(rows, event.stages):
            assert f"chosen {stage.chosen_prob * 100:.1f}%" in row or stage.chosen_prob < 0.0005
            if stage.removed >= 0.0005:
                assert f"removed {stage.removed * 100:.1f}%" in row
    # The filters of this run did cut somewhere, so the check above met real removed numbers.
    assert any(s.removed >= 0.0005 for t in run.tokens for s in t.stages)


def test_user_text_cannot_break_out(sampled):
    run, texts = sampled
    evil = evil_run(run)
    page = bundle_html(evil, FINGERPRINT, {**texts, run.tokens[2].token_id: EVIL}, title=EVIL, prompt=EVIL + CHINESE)
    assert "alert(1)</script>" not in page and "<script>alert" not in page and "<img" not in page
    assert "\u2028" not in page.split('id="qdemo-run">', 1)[1]
    parsed = parse(page)
    assert [attrs.get("id") for tag, attrs in parsed.tags if tag == "script"] == ["qdemo-run", "qdemo-meta"]
    assert not any(tag == "img" for tag, _ in parsed.tags)
    # The embedded blocks are exactly the JSON written: nothing ended them early.
    blocks = {attrs["id"]: json.loads(data) for attrs, data in parsed.scripts}
    assert blocks["qdemo-run"] == json.loads(run_to_json(evil))
    again = read_bundle(page)
    assert again.done.text == f"{EVIL}\n{CHINESE}<!-- x" and again.tokens[0].text == EVIL
    assert again.tokens[1].text == CHINESE + "\u2028" and again.label == "<b>A</b>"
    assert again.to_dict() == evil.to_dict()
    visible = "".join(parsed.text)
    assert EVIL in visible and CHINESE in visible  # shown as text, escaped, not dropped


@pytest.mark.parametrize("cut", [0.5, 0.9, 0.99])
def test_a_truncated_bundle_fails_with_a_message(sampled, cut):
    run, texts = sampled
    page = bundle_html(run, FINGERPRINT, texts)
    start = page.index('id="qdemo-run">')
    end = page.index("</script>", start)
    truncated = page[:start + int((end - start) * cut)]
    with pytest.raises(ValueError, match="cut short"):
        read_bundle(truncated)
    with pytest.raises(ValueError, match="no <script id=\"qdemo-run\">"):
        read_bundle(page[:start - 40])


def test_garbled_and_foreign_files_fail_with_a_message(sampled):
    run, texts = sampled
    page = bundle_html(run, FINGERPRINT, texts)
    garbled = page.replace('"token_ids": [', '"token_ids": [[', 1)
    with pytest.raises(ValueError, match="embedded run is damaged: the run is not valid JSON"):
        read_bundle(garbled)
    renamed = page.replace('"run_id": 7', '"run": 7', 1)
    with pytest.raises(ValueError, match="no field 'run_id'"):
        read_bundle(renamed)
    with pytest.raises(ValueError, match="empty"):
        read_bundle("  \n")
    with pytest.raises(ValueError, match="not a qdemo evidence bundle"):
        read_bundle("<!DOCTYPE html><html><body><script>alert(1)</script></body></html>")
    with pytest.raises(ValueError, match="starts with 'hello"):
        read_bundle("hello world")
    with pytest.raises(ValueError, match="must be a JSON object, got a JSON list"):
        read_bundle("[1, 2]")
    with pytest.raises(ValueError, match="cut short"):
        read_bundle(run_to_json(run)[:200])
    with pytest.raises(ValueError, match="not UTF-8"):
        read_bundle(b"\xff\xfe<html>")


def test_bundle_needs_a_fingerprint(sampled):
    run, texts = sampled
    with pytest.raises(ValueError, match="fingerprint must be a non-empty string"):
        bundle_html(run, "  ", texts)


def test_old_records_and_beam_runs_still_bundle(sampled):
    """A run saved before `removed` / `argmax_prob` existed (their keys absent) and a beam-like run both render and
    read back."""
    run, texts = sampled
    data = run.to_dict()
    for token in data["tokens"]:
        for stage in token["stages"]:
            del stage["removed"], stage["argmax_prob"]
    old = read_bundle(json.dumps(data))
    assert all(s.argmax_prob is None and s.removed == 0.0 for t in old.tokens for s in t.stages)
    page = bundle_html(old, FINGERPRINT, texts)
    assert "removed probability was not recorded" in page
    assert read_bundle(page).to_dict() == old.to_dict()


# --- issue 19 item 17: a damaged bundle is refused, never read as another run ------------------------------------

def _run_block(page: str) -> tuple[int, int]:
    start = page.index('id="qdemo-run">') + len('id="qdemo-run">')
    return start, page.index("</script>", start)


def test_one_changed_digit_in_the_embedded_run_is_refused_naming_the_digest(sampled):
    run, texts = sampled
    page = bundle_html(run, FINGERPRINT, texts)
    start, end = _run_block(page)
    original = json.loads(page[start:end])
    digits = [i for i in range(start, end) if page[i].isdigit()]
    changed = 0
    for i in digits[::max(1, len(digits) // 60)]:
        flipped = page[:i] + str((int(page[i]) + 1) % 10) + page[i + 1:]
        try:
            data = json.loads(flipped[start:end])
        except ValueError:
            continue  # no longer JSON ("01"): refused as damaged JSON, tested elsewhere
        if data == original:
            continue  # a digit past a float's precision: the same run, nothing to refuse
        changed += 1
        with pytest.raises(ValueError, match="the bundle's run does not match its digest"):
            read_bundle(flipped)
    assert changed >= 40
    assert read_bundle(page).to_dict() == run.to_dict()


def test_a_changed_digest_or_a_missing_one_is_refused(sampled):
    run, texts = sampled
    page = bundle_html(run, FINGERPRINT, texts)
    meta = bundle_meta(page)
    digest = meta["run_sha256"]
    assert re.fullmatch(r"[0-9a-f]{64}", digest)
    other = ("0" if digest[0] != "0" else "1") + digest[1:]
    with pytest.raises(ValueError, match=f"records sha256 {other[:12]}.* the run in it hashes to {digest[:12]}"):
        read_bundle(page.replace(digest, other, 1))
    without = page.replace(f'"run_sha256": "{digest}", ', "", 1)
    assert without != page
    with pytest.raises(ValueError, match="has no digest of its run"):
        read_bundle(without)


def test_a_bundle_from_before_the_digest_still_reads(sampled):
    """Version 1 bundles were written without a digest: they read as they always did."""
    run, texts = sampled
    page = bundle_html(run, FINGERPRINT, texts)
    digest = bundle_meta(page)["run_sha256"]
    old = page.replace(f'"run_sha256": "{digest}", ', "", 1).replace('"version": 2', '"version": 1', 1)
    assert read_bundle(old).to_dict() == run.to_dict()


@pytest.mark.parametrize("change,match", [
    (lambda d: d.update(model=5), "the run's model must be a model name"),
    (lambda d: d["tokens"][0].update(token_id=-1), r"token 0's id is -1: not a token id"),
    (lambda d: d["tokens"][1].update(token_id=2 ** 40), r"token 1's id is 1099511627776: not a token id"),
    (lambda d: d["tokens"][0]["stages"][0].update(token_ids=[True]), r"token 0's raw stage candidate 0 is true: not a token id"),
    (lambda d: d["prefill"].update(prompt_ids=[1, "x"]), r"prompt token 1 is 'x'"),
])
def test_a_run_with_a_field_of_the_wrong_kind_is_refused_naming_it(sampled, change, match):
    run, _ = sampled
    data = json.loads(run_to_json(run))
    change(data)
    with pytest.raises(ValueError, match=match):
        read_bundle(json.dumps(data))
