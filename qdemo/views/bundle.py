"""An evidence bundle: one run as ONE self-contained HTML file that opens offline and can be read back.

The page shows what a reader needs to trust (or repeat) a run: the model, how it ran, the weights fingerprint,
the seed and settings, the qdemo and library versions, the prompt and the answer, the metrics, which stage
decided what (qdemo.probes.decided), and the token view with every stage's numbers on hover. Hover is the token view's
own pure-CSS tooltip and the "only decided tokens" switch is a CSS checkbox: no script runs, nothing is fetched.

The run itself rides along as JSON (qdemo.core.runs serialisation) in `<script type="application/json" id="qdemo-run">`;
`read_bundle` takes it back out (or reads a plain run JSON file) without executing anything. The provenance block
holds the sha256 of the run's canonical JSON: a bundle whose run no longer matches it (one digit changed by a
damaged copy or an edit) is refused, never read as another run. Bundles of version 1 were written without it and
read as before.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import platform
import re
from datetime import datetime, timezone
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import qdemo
from qdemo.core.events import TokenEvent
from qdemo.core.runs import RunRecord, run_from_json
from qdemo.probes.decided import token_decisions
from qdemo.views.decided import answer_summary, decision_marks
from qdemo.views.labels import html_text as _e
from qdemo.views.labels import percent, stage_words, token_label
from qdemo.views.tokens import (
    DEFAULT_MEASURE,
    TOKEN_VIEW_CSS,
    token_legend_html,
    token_view_html,
)

RUN_BLOCK_ID = "qdemo-run"
META_BLOCK_ID = "qdemo-meta"
BUNDLE_VERSION = 2  # 2: the provenance holds run_sha256
MAX_TOKEN_ID = 2 ** 31 - 1  # above any tokenizer's ids: a larger one is damage, not a token
# Distribution name → label; "importable" is read from installed metadata, so nothing heavy is imported here.
LIBRARIES: tuple[tuple[str, str], ...] = (("torch", "torch"), ("transformers", "transformers"),
                                          ("gradio", "gradio"), ("llama_cpp", "llama-cpp-python"))
_TIP_MARKER = '<span class="tip" role="tooltip">'
_HEAD_END = "</span>"  # the tooltip's first row (token i · label · id) holds no other span
_BLOCK_RE = r'<script type="application/json" id="{}">(.*?)</script>'

BUNDLE_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", "Noto Sans", "PingFang SC", "Microsoft YaHei", sans-serif;
       margin: 0 auto; max-width: 980px; padding: 16px; color: #111; background: #fff; }
h1 { font-size: 20px; margin: 0 0 12px; } h2 { font-size: 16px; margin: 22px 0 8px; }
table.kv { border-collapse: collapse; font-size: 13.5px; }
table.kv th { text-align: left; font-weight: 600; padding: 2px 14px 2px 0; vertical-align: top; color: #444; }
table.kv td { padding: 2px 0; overflow-wrap: anywhere; }
pre.text { white-space: pre-wrap; overflow-wrap: anywhere; background: #f6f8fa; border: 1px solid #e1e4e8;
           border-radius: 6px; padding: 8px 10px; font-size: 14px; }
ul.decided { margin: 4px 0; padding-left: 20px; font-size: 14px; }
.only-decided-box { font-size: 13.5px; margin: 6px 0; display: block; }
#only-decided:checked ~ .tokwrap .tok:not(.marked) { opacity: .25; }
.tok .tip .tip-stage .tip-key { display: inline-block; min-width: 6.5em; }
table.stages { border-collapse: collapse; font-size: 12.5px; }
table.stages th, table.stages td { border-bottom: 1px solid #eee; padding: 1px 8px; text-align: left; }
table.stages td.num { text-align: right; font-variant-numeric: tabular-nums; }
.foot { color: #777; font-size: 12px; margin-top: 24px; }
"""


# --- provenance -------------------------------------------------------------------------------------------------

def _git_dir(root: Path) -> Path | None:
    dot = root / ".git"
    if dot.is_dir():
        return dot
    if dot.is_file():  # a worktree: ".git" is a file "gitdir: <path>"
        line = dot.read_text(encoding="utf-8").strip()
        if line.startswith("gitdir:"):
            return (root / line[len("gitdir:"):].strip()).resolve()
    return None


def _read_ref(base: Path, ref: str) -> str | None:
    if (base / ref).is_file():
        return (base / ref).read_text(encoding="utf-8").strip()
    if (base / "packed-refs").is_file():
        for line in (base / "packed-refs").read_text(encoding="utf-8").splitlines():
            if line.endswith(" " + ref):
                return line.split(" ", 1)[0]
    return None


def _git_commit(root: Path) -> str | None:
    """The checkout's commit, read from .git's files: a subprocess per export (or at import) is not worth it."""
    try:
        git = _git_dir(root)
        if git is None:
            return None
        head = (git / "HEAD").read_text(encoding="utf-8").strip()
        if not head.startswith("ref:"):
            return head or None  # a detached HEAD holds the commit itself
        ref = head[len("ref:"):].strip()
        # A worktree keeps its branches in the main repository, named by its "commondir" file.
        common = git / "commondir"
        bases = [git] + ([(git / common.read_text(encoding="utf-8").strip()).resolve()] if common.is_file() else [])
        return next((commit for base in bases if (commit := _read_ref(base, ref))), None)
    except OSError:
        return None


@lru_cache(maxsize=1)
def qdemo_version() -> str:
    """qdemo's version, with the git commit when it runs from a checkout ("0.1.0+g566eacc"); "unknown" when the
    package carries none."""
    version = getattr(qdemo, "__version__", None) or "unknown"
    commit = _git_commit(Path(qdemo.__file__).resolve().parent.parent)
    return f"{version}+g{commit[:7]}" if commit and re.fullmatch(r"[0-9a-f]{7,64}", commit) else version


def library_versions() -> dict[str, str]:
    """python and each library that is installed here (gradio and llama_cpp only when they are)."""
    versions = {"python": platform.python_version()}
    for label, dist in LIBRARIES:
        try:
            versions[label] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    return versions


# --- pieces of the page -----------------------------------------------------------------------------------------

def _kv_table(rows: Sequence[tuple[str, object]]) -> str:
    body = "".join(f"<tr><th>{_e(k)}</th><td>{_e(v)}</td></tr>" for k, v in rows)
    return f'<table class="kv">{body}</table>'


def _seed(run: RunRecord) -> str:
    if run.prefill is not None and run.prefill.seed is not None:
        return str(run.prefill.seed)
    seed = run.settings.get("seed")
    return str(seed) if seed is not None else "none (greedy: no draw)"


def _bytes(n: int | None) -> str:
    return "–" if not n else f"{n / 2 ** 20:,.1f} MiB"


def _metrics(run: RunRecord) -> list[tuple[str, object]]:
    rows: list[tuple[str, object]] = []
    if run.done is not None:
        s = run.done.stats
        rows += [("ended", run.done.reason + (f": {run.done.error}" if run.done.error else "")),
                 ("prompt tokens", s.prompt_tokens), ("new tokens", s.new_tokens),
                 ("time to first token", f"{s.ttft_seconds:.3f} s"), ("prefill", f"{s.prefill_seconds:.3f} s · "
                                                                       f"{s.prefill_tokens_per_s:,.1f} tok/s"),
                 ("decode", f"{s.decode_tokens_per_s:,.1f} tok/s"), ("total", f"{s.total_seconds:.3f} s"),
                 ("peak memory", _bytes(s.peak_memory_bytes))]
        if s.draft_proposed:
            rows.append(("speculative drafts", f"{s.draft_accepted} of {s.draft_proposed} accepted"))
    else:
        rows.append(("ended", "not finished when exported"))
    if run.prefill is not None and run.prefill.reused_tokens:
        rows.append(("prompt tokens reused from the cache", run.prefill.reused_tokens))
    kv = run.tokens[-1].kv_cache_bytes if run.tokens else (run.prefill.kv_cache_bytes if run.prefill else 0)
    rows.append(("KV cache", _bytes(kv)))
    return rows


def _token_texts(tokens: Sequence[TokenEvent], labels: Mapping[int, str]) -> list[str]:
    """Each token decoded on its own: from `labels` when given (TokenEvent.text is "" while bytes are held back)."""
    return [labels.get(t.token_id, t.text) for t in tokens]


def _stage_rows(event: TokenEvent, labels: Mapping[int, str]) -> str:
    """Tooltip rows, one per stage: the chosen token's probability, the stage's top token, what it removed."""
    rows = []
    for stage in event.stages:
        parts = [f"chosen {percent(stage.chosen_prob)}"]
        if stage.token_ids and stage.token_ids[0] != event.token_id:
            top = token_label(labels[stage.token_ids[0]]) if stage.token_ids[0] in labels else f"#{stage.token_ids[0]}"
            parts.append(f"top {_e(top)} {percent(stage.probs[0])}")
        if stage.removed > 0:
            parts.append(f"removed {percent(stage.removed)}")
        if stage.argmax_prob == 0 and stage.name != "raw":
            parts.append("raw argmax cut")
        rows.append(f'<span class="tip-row tip-stage"><span class="tip-key">{_e(stage_words(stage.name))}'
                    f'</span> {" · ".join(parts)}</span>')
    return "".join(rows)


def _with_stage_rows(view: str, tokens: Sequence[TokenEvent], labels: Mapping[int, str]) -> str:
    """token_view_html's tooltips with every stage's numbers added after their first row. The view is left as it
    is when its markup is not the expected one tooltip per token (the stage table below still has the numbers)."""
    parts = view.split(_TIP_MARKER)
    if len(parts) != len(tokens) + 1 or any(_HEAD_END not in part for part in parts[1:]):
        return view
    out = [parts[0]]
    for part, event in zip(parts[1:], tokens):
        head, rest = part.split(_HEAD_END, 1)
        out.append(_TIP_MARKER + head + _HEAD_END + _stage_rows(event, labels) + rest)
    return "".join(out)


def _stage_table(tokens: Sequence[TokenEvent], texts: Sequence[str], labels: Mapping[int, str]) -> str:
    head = ("<tr><th>#</th><th>token</th><th>stage</th><th>chosen p</th><th>top token</th><th>top p</th>"
            "<th>raw argmax p</th><th>removed</th></tr>")
    rows = []
    for i, (event, text) in enumerate(zip(tokens, texts)):
        for stage in event.stages:
            top = stage.token_ids[0] if stage.token_ids else None
            top_label = "–" if top is None else (token_label(labels[top]) if top in labels else f"#{top}")
            rows.append(f"<tr><td>{i}</td><td>{_e(token_label(text))}</td><td>{_e(stage.name)}</td>"
                        f'<td class="num">{percent(stage.chosen_prob)}</td><td>{_e(top_label)}</td>'
                        f'<td class="num">{percent(stage.probs[0] if stage.probs else None)}</td>'
                        f'<td class="num">{percent(stage.argmax_prob)}</td><td class="num">{percent(stage.removed)}</td></tr>')
    return f'<table class="stages">{head}{"".join(rows)}</table>'


def _prompt_text(run: RunRecord, prompt: str | None, labels: Mapping[int, str]) -> tuple[str, str]:
    """(heading note, text) for the prompt section."""
    if prompt is not None:
        return "", prompt
    ids = list(run.prefill.prompt_ids) if run.prefill else []
    if ids and all(i in labels for i in ids):
        return " (its tokens decoded one by one)", "".join(labels[i] for i in ids)
    if ids:
        return " (token ids: no token texts were given)", " ".join(str(i) for i in ids)
    return "", "(no prompt recorded)"


def _json_block(block_id: str, data: Any) -> str:
    """JSON in a non-executed script block. "<", ">" and "&" only occur inside JSON strings, where their \\u escapes
    mean the same characters, so no "</script>" (or "<!--") in user text can end the block; U+2028/9 likewise."""
    text = json.dumps(data, ensure_ascii=False)
    for ch, esc in (("&", "\\u0026"), ("<", "\\u003c"), (">", "\\u003e"), ("\u2028", "\\u2028"), ("\u2029", "\\u2029")):
        text = text.replace(ch, esc)
    return f'<script type="application/json" id="{block_id}">{text}</script>'


# --- the bundle -------------------------------------------------------------------------------------------------

def bundle_html(run: RunRecord, fingerprint: str, texts: Mapping[int, str] | None = None, title: str | None = None,
                *, prompt: str | None = None, measure: str = DEFAULT_MEASURE) -> str:
    """The run as one offline HTML page. `fingerprint` identifies the weights (a GGUF's sha256, a checkpoint
    fingerprint); `texts` maps token ids to their decoded text (the answer's and every listed alternative's, as
    qdemo.services.chat.AnswerView.labels does): without it tokens show their streamed text and alternatives
    their ids. `prompt` is the prompt as text (a RunRecord keeps only its ids)."""
    if not isinstance(fingerprint, str) or not fingerprint.strip():
        raise ValueError(f"bundle fingerprint must be a non-empty string naming the weights, got {fingerprint!r}")
    labels = dict(texts or {})
    title = title or f"qdemo run {run.run_id} · {run.model}"
    versions = library_versions()
    version = qdemo_version()
    exported = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
    token_texts = _token_texts(run.tokens, labels)
    decisions = token_decisions(run.tokens)
    view = _with_stage_rows(token_view_html(run.tokens, token_texts, labels, measure, marks=decision_marks(decisions)),
                            run.tokens, labels)
    prompt_note, prompt_body = _prompt_text(run, prompt, labels)
    answer = run.done.text if run.done is not None else "".join(t.text for t in run.tokens)
    provenance = [("model", run.model), ("how it ran", run.forward or "not recorded"),
                  ("weights fingerprint", fingerprint.strip()), ("seed", _seed(run)), ("label", run.label or "–"),
                  ("qdemo", version), *versions.items(), ("exported", exported)]
    settings = sorted(run.settings.items())
    summary = "".join(f"<li>{_e(line)}</li>" for line in answer_summary(decisions)) or "<li>no tokens</li>"
    meta = {"format": "qdemo evidence bundle", "version": BUNDLE_VERSION, "run_sha256": run_digest(run.to_dict()),
            "fingerprint": fingerprint.strip(), "qdemo": version,
            "libraries": versions, "exported": exported, "title": title, "prompt": prompt,
            "texts": {str(k): v for k, v in sorted(labels.items())}}
    return "".join([
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">",
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{_e(title)}</title><style>{TOKEN_VIEW_CSS}{BUNDLE_CSS}</style></head><body>",
        f"<h1>{_e(title)}</h1>",
        "<h2>Provenance</h2>", _kv_table(provenance),
        "<h2>Settings</h2>", _kv_table(settings) if settings else "<p>none recorded</p>",
        "<h2>Metrics</h2>", _kv_table(_metrics(run)),
        f"<h2>Prompt{_e(prompt_note)}</h2>", f'<pre class="text">{_e(prompt_body)}</pre>',
        "<h2>Answer</h2>", f'<pre class="text">{_e(answer)}</pre>',
        "<h2>Which stage decided</h2>", f'<ul class="decided">{summary}</ul>',
        "<h2>Tokens</h2>", token_legend_html(measure),
        '<input type="checkbox" id="only-decided"><label for="only-decided" class="only-decided-box">'
        "dim the tokens where no stage decided anything</label>",
        f'<div class="tokwrap">{view}</div>',
        "<h2>Every stage of every token</h2>",
        f"<details><summary>{len(run.tokens)} tokens × their stages</summary>"
        f"{_stage_table(run.tokens, token_texts, labels)}</details>",
        f'<p class="foot">Exported by qdemo {_e(version)}. The run is embedded below as JSON '
        f'(script id "{RUN_BLOCK_ID}"): qdemo\'s import reads this file back.</p>',
        _json_block(RUN_BLOCK_ID, run.to_dict()), _json_block(META_BLOCK_ID, meta),
        "</body></html>\n",
    ])


# --- reading it back --------------------------------------------------------------------------------------------

def _text(data: str | bytes) -> str:
    if isinstance(data, bytes):
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ValueError(f"the file is not UTF-8 text (byte {exc.start} is not): expected a qdemo evidence "
                             "bundle (.html) or a run's JSON") from None
    if not isinstance(data, str):
        raise ValueError(f"expected the file's text, got {type(data).__name__}")
    return data


def _block(text: str, block_id: str) -> str | None:
    """The JSON inside the bundle's block, or None when the page has no such block. Only text is matched: nothing
    in the page is run."""
    match = re.search(_BLOCK_RE.format(block_id), text, flags=re.DOTALL)
    if match:
        return match.group(1)
    if f'<script type="application/json" id="{block_id}">' in text:
        raise ValueError(f"the bundle is cut short: its {block_id} data has no end (</script> is missing)")
    return None


def read_bundle(text: str | bytes) -> RunRecord:
    """The run in an evidence bundle's HTML, or in a plain run JSON file (RunRecord.to_dict). A ValueError says what
    the text is instead: empty, cut short, damaged JSON (with where), a run that does not match the bundle's digest,
    a field of the wrong kind (the model, a token id), or neither kind of file."""
    body = _text(text).lstrip("\ufeff \t\r\n")
    if not body:
        raise ValueError("the file is empty: expected a qdemo evidence bundle (.html) or a run's JSON")
    if body.startswith(("{", "[")):
        return checked_run(run_from_json(body))
    if body.startswith("<"):
        block = _block(body, RUN_BLOCK_ID)
        if block is None:
            raise ValueError(f'this HTML is not a qdemo evidence bundle: it has no <script id="{RUN_BLOCK_ID}"> '
                             "block with the run")
        try:
            record = run_from_json(block)
        except ValueError as exc:
            raise ValueError(f"the bundle's embedded run is damaged: {exc}") from None
        _check_digest(body, block)
        return checked_run(record)
    raise ValueError(f"expected a qdemo evidence bundle (.html) or a run's JSON, but the text starts with "
                     f"{body[:20]!r}")


def run_digest(data: Any) -> str:
    """The sha256 of a run's canonical JSON (keys sorted, no spaces, UTF-8): the same for the dict a bundle is
    written from and for the JSON read back out of it, however the page escaped it."""
    text = json.dumps(data, ensure_ascii=False, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


def _check_digest(page: str, block: str) -> None:
    """Refuse a bundle whose run is not the run it was exported with."""
    meta = bundle_meta(page)
    written = meta.get("run_sha256")
    if written is None:
        if meta.get("version", 1) == 1:
            return  # exported before bundles carried a digest: nothing to check against
        raise ValueError("the bundle has no digest of its run (run_sha256 is missing from its provenance): it was "
                         "edited or damaged after export")
    actual = run_digest(json.loads(block))
    if written != actual:
        raise ValueError(f"the bundle's run does not match its digest: the bundle records sha256 {str(written)[:12]}…, "
                         f"the run in it hashes to {actual[:12]}…; it was changed after export (a damaged copy or "
                         "an edit), so its numbers cannot be trusted")


def run_ids(run: RunRecord) -> Iterator[tuple[str, Any]]:
    """Every token id a run holds, each with where it sits ("token 3's id", "prompt token 0", …)."""
    for i, token in enumerate(run.prefill.prompt_ids if run.prefill else ()):
        yield f"prompt token {i}", token
    for i, event in enumerate(run.tokens):
        yield f"token {i}'s id", event.token_id
        for stage in event.stages:
            for j, token in enumerate(stage.token_ids):
                yield f"token {i}'s {stage.name} stage candidate {j}", token
    for i, token in enumerate(run.done.token_ids if run.done else ()):
        yield f"the answer's token {i}", token


def checked_run(run: RunRecord) -> RunRecord:
    """`run` when its model is a name and every token id a whole number from 0 to MAX_TOKEN_ID; else a ValueError
    naming the first field that is not (a run read from a file may say anything)."""
    if not isinstance(run.model, str):
        raise ValueError(f"the run's model must be a model name (text), got {_shown(run.model)}")
    for where, token in run_ids(run):
        if isinstance(token, bool) or not isinstance(token, int) or not 0 <= token <= MAX_TOKEN_ID:
            raise ValueError(f"{where} is {_shown(token)}: not a token id (a whole number from 0 to {MAX_TOKEN_ID})")
    return run


def _shown(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    text = repr(value)
    return text if len(text) <= 40 else text[:39] + "…"


def bundle_meta(text: str | bytes) -> dict[str, Any]:
    """The bundle's provenance (fingerprint, versions, prompt, token texts) as written by `bundle_html`."""
    block = _block(_text(text), META_BLOCK_ID)
    if block is None:
        raise ValueError(f'this HTML is not a qdemo evidence bundle: it has no <script id="{META_BLOCK_ID}"> block')
    try:
        meta = json.loads(block)
    except json.JSONDecodeError as exc:
        raise ValueError(f"the bundle's provenance is damaged: {exc.msg} at line {exc.lineno}, column {exc.colno}"
                         ) from None
    if not isinstance(meta, dict):
        raise ValueError(f"the bundle's provenance must be a JSON object, got a JSON {type(meta).__name__}")
    return meta
