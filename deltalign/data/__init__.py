"""Data: formats and validation, tokenisation with completion-only labels, low-padding batching."""
