"""Core: token ids in, events out — the one generation core every tab, endpoint and benchmark streams from.

- `decode`: the `DecodeState` (rows of ids and the KV cache of exactly those, kept between calls: crop, fork,
  select) and the step primitives (`prefill` in gated chunks, `decode_step`, `choose`, `position_logits`).
- `chain`: the logits-processor chain stage by stage (transformers' own processors) and each stage's top-N.
- `emit`: the one emission path — a chosen token is detokenized, checked against the stop rules and the clock
  (Stop, time limit, disconnect) and becomes a TokenEvent; every run ends in one DoneEvent.
- `engine`: plain runs, forked rows, left-padded batches, speculative decoding (`speculative`) and beam search
  (`beams`), all through `emit`.
- `events`, `runs`: plain data (prefill / token / progress / done; a run's record). `textstream`: UTF-8-safe
  incremental decoding. `metrics`: timers and memory readings.

Knows nothing of Gradio, chats, users or servers; imports `qdemo.forwards` and `qdemo.models` only.
"""
