"""Evaluation: lm-eval CSQA tasks (:mod:`.csqa`), GSM8K zero-shot CoT (:mod:`.gsm8k`), perplexity
(:mod:`.perplexity`)."""
