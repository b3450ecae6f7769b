"""Gradio wiring. Builders only: generation lives in qdemo.engine, figures in qdemo.views."""
