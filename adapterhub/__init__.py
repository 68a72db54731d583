"""adapterhub: catalog, validate, merge, combine and share LoRA adapters."""
__version__ = "0.1.0"
