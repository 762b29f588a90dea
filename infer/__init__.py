"""Inference: KV-cached batching engine, OpenAI-compatible server, chat CLI and web UI."""
