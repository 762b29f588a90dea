"""The data pipeline: tokenizer, the built-in synthetic corpus, `prepare` (jsonl -> memory-mapped
tokens, loss weights and meta.json) and the loaders that turn prepared data into batches."""
