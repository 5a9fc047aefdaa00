"""Prompt sources: the built-in arithmetic task and `datasets` sources (GSM8k-style prompt/answer columns)."""
