"""Data for lclm: synthetic long-context tasks, text sources, tokenizers (bytes, Hugging Face
``tokenizer.json``, SentencePiece), Grain pipelines.

The TFDS builders live in ``lclm.data.tfds_builders`` (imported on demand: it loads
tensorflow_datasets, which training on generated data does not need).
"""

from lclm.data.landmark import LandmarkTransform
from lclm.data.mqar import MqarConfig, make_mqar_batch, make_mqar_example
from lclm.data.passkey import PasskeyConfig, make_passkey_example
from lclm.data.pipeline import (BATCH_KEYS, make_batch_iterator, make_eval_batches,
                                make_train_dataset, make_train_iterator)
from lclm.data.synthetic_source import SyntheticBatchSource, SyntheticSource
from lclm.data.text import TokenizedTextSource, text_file_source, tfds_text_source
from lclm.data.tokenizer import (ByteTokenizer, HFTokenizer, SentencePieceTokenizer, Tokenizer,
                                  load_tokenizer)

__all__ = [
    "BATCH_KEYS", "ByteTokenizer", "HFTokenizer", "LandmarkTransform", "MqarConfig",
    "SentencePieceTokenizer",
    "Tokenizer", "load_tokenizer", "PasskeyConfig", "SyntheticBatchSource",
    "SyntheticSource", "TokenizedTextSource", "make_batch_iterator", "make_eval_batches",
    "make_mqar_batch", "make_mqar_example", "make_passkey_example", "make_train_dataset",
    "make_train_iterator", "text_file_source", "tfds_text_source",
]
