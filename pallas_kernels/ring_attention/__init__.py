"""Ring attention and context parallelism: attention over a sequence split across devices."""

from pallas_kernels.ring_attention.context_parallel import (context_parallel_attention,
                                                            context_parallel_shard,
                                                            validate_configuration)
from pallas_kernels.ring_attention.layouts import (from_layout, load_balance_permutation,
                                                   to_layout)
from pallas_kernels.ring_attention.ops import ring_attention
from pallas_kernels.ring_attention.reference import ring_attention_reference

__all__ = ["context_parallel_attention", "context_parallel_shard", "from_layout",
           "load_balance_permutation", "ring_attention", "ring_attention_reference",
           "to_layout", "validate_configuration"]
