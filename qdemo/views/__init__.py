"""Pure views: engine events and introspection arrays in, plotly figures, pandas frames and HTML strings out
(no torch, no gradio, no transformers)."""
