"""Services: what the app does, without Gradio — chat, compare, the sampling lab, internals, inspect views,
branches, batch, performance, settings.

Every request that runs a model passes `Services.admit` first (rate limit, model name and forward, sampling
settings and limits, load, lease) and reaches the model only through the leased `Backend`. The UI tabs and the
named API endpoints call the same functions here. Per-session state that outlives a request lives here too
(`kept_states`: decode states kept between turns). Imports views and serving (and below); never gradio or ui.
"""
