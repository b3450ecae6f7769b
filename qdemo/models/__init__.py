"""Models: what a model is and how its files become a loaded model, before anything runs it.

- `registry`: models.yaml → validated `ModelSpec`s (a bad entry fails loudly, naming it).
- `sources`: a spec → a local checkpoint directory (hub, local path, or GGUF parts shipped in packages: assembled,
  sha256-checked, dequantized once, cached), readiness, size estimates.
- `families/`: what differs per family (Qwen2, Qwen v1, Baichuan, Baichuan2, the ALiBi 13Bs): conversion to a
  native checkpoint, the chat-prompt builder, stop tokens, position-encoding facts.
- `loader`: the one place that calls `from_pretrained` (one load at a time in a process); device and dtype;
  `LoadedModel` and its token-id check.
- `prompting`: the conversation model (messages, turns, validation) and prompts that never turn typed text into
  special tokens. `progress`: progress reports per tensor. `cpu_layout`: fp32 weights laid out for CPU mat-vecs.

The bottom layer: it imports nothing else of qdemo but the shared vocabulary (`qdemo.errors`, `qdemo.sampling`).
"""
