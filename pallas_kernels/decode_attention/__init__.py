"""Decode attention (flash-decoding): public op, naive reference, Pallas (TPU, GPU) and
blockwise XLA backends; block retrieval (``block_indices``) with its block scores and
selection (``retrieval``)."""

from pallas_kernels.decode_attention.ops import decode_attention
from pallas_kernels.decode_attention.reference import (block_retrieval_mask,
                                                       decode_attention_reference)
from pallas_kernels.decode_attention.retrieval import (block_key_bounds, quest_block_scores,
                                                       representative_block_scores,
                                                       select_blocks)

__all__ = ["block_key_bounds", "block_retrieval_mask", "decode_attention",
           "decode_attention_reference", "quest_block_scores", "representative_block_scores",
           "select_blocks"]
