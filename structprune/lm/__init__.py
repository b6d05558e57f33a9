"""Causal language models from the command line: plain text chunked into blocks (:mod:`.data`), perplexity
(:mod:`.perplexity`), pruning with random, gain or L0 and next-token distillation (:mod:`.prune`), and the
``--task causal-lm`` of ``structprune prune`` and ``structprune eval`` (:mod:`.command`)."""
