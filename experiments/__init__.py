"""Entry points: training (train), the kernel demo and the kernel benchmark."""
