"""The harness: benchmarks and load tools that measure the app from outside (`python -m qdemo bench|loadtest|
faults|serve-llama`).

- `single`: the engine against transformers' `generate`, one stream. `scenarios`: multi-turn, A/B, assisted and
  inspect against the old way of doing each. `forwards`: the llama.cpp forward against torch, HF and llama-server.
  `probes`: what each Inspect view costs.
- `loadtest`: concurrent sessions on loopback. `faults`: abuse replayed against a served app.
  `llama_server`: llama.cpp's own server on loopback (optional: requirements-llama-server.txt).

May import any wing; nothing in the app imports it.
"""
