"""The model layer: the GPT assembled from registered components, and what runs it.

Assembly (gpt), the shared layers plugins build on, memory estimates, generation, tokenizers,
parameter summaries, weight layouts (interop) and quantized linears. May import base and spec.
"""
