"""What the app does, without Gradio: chat, compare, sampling lab, internals and performance services.

The UI tabs wire Gradio components to these functions and nothing else; every request that runs a model passes
`Services.admit` first (rate limit, model name, sampling settings and limits, load, lease) and reaches the model
only through the leased backend's gated path.
"""
