"""Long Range Arena (Tay et al. 2020) for lclm's decoder language models.

LRA's five classification tasks, each cast as next-token prediction with one fixed ``seq_len``
per task. Every example is ``seq_len + 1`` tokens, left-padded so that the answer is last:

  PAD ... PAD  BOS  x_1 ... x_n  ANSWER  label

``inputs = s[:-1]``, ``targets = s[1:]`` (int32 [seq_len]), ``loss_mask`` (uint8 [seq_len]) 1
only at the last position (input ANSWER, target the class token ``label_base + c``), and the
class as the int32 feature ``label``. Content ids lie in ``[FIRST_FREE_ID, label_base)``, clear
of the markers of ``lclm.data.token_layout``; the class tokens come right after them. Accuracy
is the share of examples whose last-position prediction is the class token.

===========  =====================================================  =========  ===========
task         content                                                LRA length  Transformer
===========  =====================================================  =========  ===========
ListOps      nested ``[MAX`` / ``[MIN`` / ``[MED`` / ``[SM`` over   2K          36.4
             digits, 10 classes (generated: :mod:`.listops`)
Text         IMDB reviews as bytes, 2 classes (:func:`lra_text_     4K          64.3
             source`, TFDS ``imdb_reviews``)
Retrieval    two AAN papers as bytes, does one cite the other       4K each     57.5
             (:func:`lra_retrieval_source`, LRA's TSV files)
Image        CIFAR-10 in grayscale, 1024 pixels, 10 classes         1K          42.4
             (:func:`lra_image_source`, TFDS ``cifar10``)
Pathfinder   32x32 image: are the two dots joined by a dashed       1K          71.4
             curve, 2 classes (generated: :mod:`.pathfinder`)
===========  =====================================================  =========  ===========

(Accuracies in %, the vanilla Transformer of the LRA paper; chance is 10 / 50 / 50 / 10 / 50.)

LRA's rules: models train from scratch on each task's own data (no pretraining, no extra data),
on byte- or pixel-level inputs (no tokenizer, no 2D image structure given). Here Retrieval joins
both documents in one sequence (``BOS doc_1 SEP doc_2``; LRA encoded them separately, 4K bytes
each), so its default ``seq_len`` of 4000 keeps ``(seq_len - 3) // 2`` bytes of each.

The generated tasks are random-access by seed
(``SyntheticSource(make_listops_example, ListOpsConfig(), seed=...)``, or by name through
``lclm.data.synthetic_tasks``: ``"listops"``, ``"pathfinder"``); the data-backed loaders read
local files only and raise ``FileNotFoundError`` saying how to prepare the data once.
"""

from lclm.data.lra.listops import (LISTOPS_FEATURES, ListOpsConfig, decode_listops,
                                   encode_listops, evaluate_listops, make_listops_example)
from lclm.data.lra.loaders import (BYTE_LABEL_BASE, BYTE_VOCAB_SIZE, IMAGE_FEATURES,
                                   IMAGE_LABEL_BASE, IMAGE_SEQ_LEN, IMAGE_VOCAB_SIZE,
                                   RETRIEVAL_FEATURES, TEXT_FEATURES, AanPairsFile, MappedSource,
                                   cifar_example, classification_example, content_tokens,
                                   decode_bytes, grayscale, imdb_example, lra_image_source,
                                   lra_retrieval_source, lra_text_source, retrieval_example)
from lclm.data.lra.pathfinder import (PATHFINDER_FEATURES, PathfinderConfig,
                                      make_pathfinder_example, pathfinder_image,
                                      render_pathfinder)

# Accuracy (%) of the vanilla Transformer in the LRA paper (Tay et al. 2020, Table 1).
TRANSFORMER_ACCURACY = {"listops": 36.4, "text": 64.3, "retrieval": 57.5, "image": 42.4,
                        "pathfinder": 71.4}

__all__ = [
    "AanPairsFile", "BYTE_LABEL_BASE", "BYTE_VOCAB_SIZE", "IMAGE_FEATURES", "IMAGE_LABEL_BASE",
    "IMAGE_SEQ_LEN", "IMAGE_VOCAB_SIZE", "LISTOPS_FEATURES", "ListOpsConfig", "MappedSource",
    "PATHFINDER_FEATURES", "PathfinderConfig", "RETRIEVAL_FEATURES", "TEXT_FEATURES",
    "TRANSFORMER_ACCURACY", "cifar_example", "classification_example", "content_tokens",
    "decode_bytes", "decode_listops", "encode_listops", "evaluate_listops", "grayscale",
    "imdb_example", "lra_image_source", "lra_retrieval_source", "lra_text_source",
    "make_listops_example", "make_pathfinder_example", "pathfinder_image", "render_pathfinder",
    "retrieval_example",
]
