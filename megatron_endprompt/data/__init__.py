"""Data at training time: tokenizers, EndPromptDataset, the dataset builder (offline
preparation lives in ``prep/``)."""
