"""qdemo: see how Qwen and Baichuan language models think.

Wings, each importing only the ones below it (`lint-imports` checks it; see README "Layout"):
ui → services → views | serving → probes → core → forwards → models, with `errors` and `sampling` shared by all
and `bench` (the harness) above everything.
"""

__version__ = "0.1.0"
