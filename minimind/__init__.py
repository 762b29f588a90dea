"""minimind: a compact trainer for small language models, from tokenizer to served chat model."""

__version__ = "0.1.0"
