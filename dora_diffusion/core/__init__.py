"""The layer core: the DoRA/LoRA math (norms, geometry, autograd, forward paths), the wrapper layer, and
injection into a model. Knows nothing of files, pipelines or training."""
