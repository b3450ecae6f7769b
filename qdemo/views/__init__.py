"""Views: pure functions from events, runs and arrays to what people read — plotly figures, pandas frames, HTML
and Markdown strings. One place for words and numbers (`labels`: token labels, percentages, stage names).

No torch, no gradio, no transformers, no model calls; imports only plain data from core and probes.
"""
