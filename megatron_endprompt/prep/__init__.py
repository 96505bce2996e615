"""Offline corpus preparation, run once before training: the embedded default corpus (JSONL),
SentencePiece tokenizer training, JSONL -> Megatron ``.bin``/``.idx`` preprocessing, the passkey
training corpus, and the staged indexed-dataset writer they share. Training itself reads only
``data/`` (tokenizers, ``EndPromptDataset``, the dataset builder)."""
