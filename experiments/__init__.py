"""Entry points: the kernel quickstart and benchmarks (training and evaluation to come)."""
