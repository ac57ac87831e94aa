"""Evaluation: passkey demo, RULER-style suite, perplexity, attention-level recall."""
