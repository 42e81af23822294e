"""Layer 2, the runtime: attaching a stack to a model instance and running the compressed forward.

``attach`` (compress, the handle), ``interception`` (the forward installed on the model's inner module:
prefill, decode or the model's own), ``prefill`` (the pre-LLM stages, the layout, the decoder layers run
one by one with the decoder stages before each), ``context`` (what a stage sees), ``scorer`` (attention
rows recomputed without an N x N matrix), ``encoder`` (stages inside a vision encoder), ``sequence`` (the
packed decoder sequence), ``cache``, ``adapter`` (the contract every model family implements),
``compat`` (what moves between transformers releases) and ``loading`` (checkpoints from disk).
"""
