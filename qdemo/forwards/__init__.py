"""Forwards: how a loaded model runs one forward and keeps its KV cache — the only code that calls a model.

- `runner`: the `Runner` protocol (feed columns after a state's width → fp32 logits; crop, fork, select, release;
  guard) and the `RunnerState` it reads.
- `torch_runner`: a transformers model with a DynamicCache. `llama_cpp`: llama.cpp's forward over a GGUF's own
  blocks, one context whose sequences are a state's rows (optional: requirements-llama.txt), and its loader.
- `gate`: the `StepGate` (one forward at a time per model, in arrival order) and the guard that refuses an
  ungated forward. `choice`: which forward runs an entry here (auto | llama.cpp | torch).

Imports only `qdemo.models` below it; the decode state and the loop that drives runners live in `qdemo.core`.
"""
