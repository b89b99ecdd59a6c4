"""llm: the estimators of ``theory`` lifted to transformers fine-tuning (needs the ``llm`` extra)."""
