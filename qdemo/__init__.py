"""qdemo: see how Qwen and Baichuan language models think.

Data flows one way (see DESIGN.md): registry → sources → loader → engine → events → views → ui.
"""

__version__ = "0.1.0"
