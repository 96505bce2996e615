"""Data: tokenizers, JSONL -> indexed binary preprocessing, EndPromptDataset."""
