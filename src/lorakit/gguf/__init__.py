from .writer import export_gguf, write_gguf, QUANTS, GGUFReport  # noqa: F401
