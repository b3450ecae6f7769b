"""Serving: models shared by every user of one process, behind the `Backend` protocol.

- `protocol`: `Backend` (what services may ask of a model) and `Capabilities` (what it can feed, as data).
- `local`: `LocalBackend`, a pooled model leased for one request with every forward through its step gate.
- `remote`: `RemoteBackend`, a model on an OpenAI-compatible server (tokens with its top log-probabilities).
- `pool`: loaded models within a memory budget (LRU of idle models, leases, one gate per copy); `budget` reads
  QDEMO_MAX_MEMORY. `limits`: the server's limits, the rate limiter and text hygiene.

Nothing per user lives here (a session's kept decode state belongs to `qdemo.services.kept_states`, counted in the
pool's budget as a tenant). Imports probes, core, forwards and models below it; never views, services or ui.
"""
