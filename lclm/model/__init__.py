"""Models: a decoder LM from a per-layer pattern of registered sequence mixers."""

# Importing these registers the built-in mixers.
from lclm.model import (mixers, mixers_lightning, mixers_mamba, mixers_mamba2, mixers_s4d,
                        mixers_titans)
from lclm.model.decoder import DecoderBlock, DecoderCache, DecoderLM
from lclm.model.kv_cache import KVCacheSize, LayerKVCache, kv_cache_size, kv_cache_size_for
from lclm.model.registry import (POSITION_OPTIONS, get_mixer, register_mixer, registered_mixers,
                                 unregister_mixer)

__all__ = [
    "POSITION_OPTIONS", "DecoderBlock", "DecoderCache", "DecoderLM", "KVCacheSize",
    "LayerKVCache", "get_mixer", "kv_cache_size", "kv_cache_size_for", "mixers",
    "mixers_lightning", "mixers_mamba", "mixers_mamba2", "mixers_s4d", "mixers_titans",
    "register_mixer",
    "registered_mixers", "unregister_mixer",
]
