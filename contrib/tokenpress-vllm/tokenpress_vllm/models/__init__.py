"""vLLM model classes (one module per family) that serve a model with tokenpress stacks."""
