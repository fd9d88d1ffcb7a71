"""Evaluation: loading a model to evaluate (a run, a converted or a Hugging Face checkpoint),
the long-context probes (needles, RULER-style tasks, lost in the middle, LRA, perplexity by
position) and their reports, the retrieval-head probe, scoring through the decode cache
(:mod:`lclm.evals.cache_scoring`, for KV-cache policies), and the lm-evaluation-harness
adapter (:mod:`lclm.evals.harness`, with the ``eval`` extra).

Submodules are imported on demand (``from lclm.evals import loading``).
"""
