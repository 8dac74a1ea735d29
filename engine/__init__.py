"""The generation engine: continuous batching over transformers' model code. No Ray, no HTTP."""
