"""Model: position-aware RoPE, layer specs (te / local), EndPromptGPTModel."""
