"""Long-context evaluation: passkey, needle, perplexity by position."""
