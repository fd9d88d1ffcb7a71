"""Hugging Face checkpoints: load them as :class:`lclm.model.DecoderLM`, write them back.

    model = lclm.hf.load_pretrained("path/to/Llama-3.2-1B")            # no torch needed
    lclm.hf.save_pretrained(model, "out/", architecture="llama")      # transformers loads it

Architectures read: Llama (rope types default, linear, dynamic, yarn, longrope, llama3),
Mistral, Mixtral, Qwen2, Qwen3, Phi-3, Gemma 2, Gemma 3 (text) and the Mamba family; written: Llama,
Mistral, Qwen2 and Mamba-2 (:func:`architectures` tells which export).
"""

from lclm.hf.files import read_config
from lclm.hf.pretrained import (Architecture, UnsupportedConfigError, architecture_of,
                                architectures, build_model, gin_config, load_pretrained,
                                model_options,
                                model_params, register_architecture, save_pretrained)

__all__ = ["Architecture", "UnsupportedConfigError", "architecture_of", "architectures",
           "build_model", "gin_config", "load_pretrained", "model_options", "model_params", "read_config",
           "register_architecture", "save_pretrained"]
