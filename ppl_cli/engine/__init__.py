"""How documents are scored: the model loaded, documents -> token ids -> windows -> batched forward passes."""
