"""Probes: looking inside a model with its weights, activations or full logits, on the core's primitives.

- `lens`: the logit lens (each layer's residual through the model's own norm and lm_head).
- `attribution`: gradient × input and occlusion, per token or per turn of a chat.
- `scoring`: teacher-forced scores of any text and the divergence of two models (the one teacher-forced path).
- `introspect`: attention maps, RoPE / ALiBi facts read from the model's modules, the model card.
- `decided`: which sampling stage decided what at each token (data; `qdemo.views.decided` says it in words).
- `stages`: the sampling chain on fixed logits (the Sampling lab's numbers).

Every forward goes through the lock the caller passes (the model's step gate). No Gradio, no views.
"""
