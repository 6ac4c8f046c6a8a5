"""The testbed: a synthetic multilingual corpus, its tokenizer, and a small NLLB-MoE trained on them (README.md)."""
