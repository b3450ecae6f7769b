"""Gradio wiring. Builders only: generation lives in qdemo.core.engine, figures in qdemo.views."""
