"""Training the hash maps (corpus, q/k/v capture, trainer) and the attention-level recall evaluation."""
