"""UI: Gradio wiring only. One small module per tab whose `build` lays out components and wires events; handlers
are module-level functions over qdemo.services, and every page event and named endpoint passes one wrapper
(admission, readable refusals). Generation lives in qdemo.core, figures in qdemo.views."""
