"""Pure views: engine events and introspection arrays in, plotly figures and pandas frames out (no torch, no gradio)."""
