"""Real tokenizers on vocabularies trained by the test: a byte-level BPE tokenizer.json
(checked against transformers' AutoTokenizer) and a SentencePiece model; load_tokenizer's
dispatch and errors; the text source, TextTask and experiments.generate with them."""

from __future__ import annotations

import json
import pickle
import types

import numpy as np
import pytest

from lclm.data import text
from lclm.data import tokenizer as tokenizer_lib

SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "hello world, hello tokenizers; hello again.",
    "Grüße aus Köln — ½ ∑ 🎉 日本語",
    "a long context needs a good tokenizer and a good model",
]
ASCII = [s for s in SENTENCES if s.isascii()]
SPECIALS = ["<pad>", "<s>", "</s>"]  # ids 0, 1, 2 in both trained vocabularies


def _added_token(content):
  """A special token in tokenizer_config.json's AddedToken form (as transformers writes it)."""
  return {"__type": "AddedToken", "content": content, "lstrip": False, "normalized": False,
          "rstrip": False, "single_word": False, "special": True}


def _train_bpe(folder, *, config=True):
  """A byte-level BPE tokenizer.json in ``folder`` (vocabulary 300, specials first) whose
  post-processor adds <s> ... </s>, which encode must not apply by itself."""
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=SPECIALS, show_progress=False,
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
  tok.train_from_iterator(SENTENCES, trainer)
  tok.post_processor = processors.TemplateProcessing(
      single="<s> $A </s>", special_tokens=[("<s>", 1), ("</s>", 2)])
  folder.mkdir(parents=True, exist_ok=True)
  tok.save(str(folder / "tokenizer.json"))
  if config:
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<s>", "eos_token": _added_token("</s>"), "pad_token": "<pad>",
        "tokenizer_class": "PreTrainedTokenizerFast"}))
  return folder


def _train_sentencepiece(folder, **options):
  """A 60-piece SentencePiece BPE model ``folder/tokenizer.model`` (unk 0, bos 1, eos 2)."""
  import sentencepiece as spm

  folder.mkdir(parents=True, exist_ok=True)
  corpus = folder / "corpus.txt"
  corpus.write_text("\n".join(ASCII * 4), encoding="utf-8")
  spm.SentencePieceTrainer.train(
      input=str(corpus), model_prefix=str(folder / "tokenizer"), vocab_size=60,
      model_type="bpe", character_coverage=1.0, normalization_rule_name="identity",
      hard_vocab_limit=False, minloglevel=2, **options)
  return folder


@pytest.fixture(scope="module")
def bpe_dir(tmp_path_factory):
  return _train_bpe(tmp_path_factory.mktemp("bpe"))


@pytest.fixture(scope="module")
def sp_dir(tmp_path_factory):
  return _train_sentencepiece(tmp_path_factory.mktemp("sp"))


@pytest.mark.parametrize("sentence", SENTENCES + ["", "unseen words: zebra quokka"])
def test_hf_round_trip_and_explicit_specials(bpe_dir, sentence):
  tok = tokenizer_lib.HFTokenizer(str(bpe_dir))
  ids = tok.encode(sentence)
  assert ids.dtype == np.int32 and ids.ndim == 1
  assert not np.isin(ids, [0, 1, 2]).any()  # the post-processor's <s> </s> are not added
  assert tok.decode(ids) == sentence
  framed = tok.encode(sentence, add_bos=True, add_eos=True)
  assert framed[0] == 1 and framed[-1] == 2
  np.testing.assert_array_equal(framed[1:-1], ids)
  assert tok.decode(np.concatenate([[0, 0], framed, [0]])) == sentence  # specials skipped
  np.testing.assert_array_equal(tok.encode(sentence, add_eos=True), np.append(ids, 2))


def test_hf_special_ids_and_vocab(bpe_dir):
  tok = tokenizer_lib.HFTokenizer(str(bpe_dir / "tokenizer.json"))
  assert (tok.pad_id, tok.bos_id, tok.eos_id, tok.eos_ids) == (0, 1, 2, (2,))
  assert tok.vocab_size == 300
  assert isinstance(tok, tokenizer_lib.Tokenizer)
  with pytest.raises(ValueError, match=r"ids must lie in \[0, 300\)"):
    tok.decode([5, 300])
  clone = pickle.loads(pickle.dumps(tok))  # Grain workers receive the source pickled
  np.testing.assert_array_equal(clone.encode(SENTENCES[2]), tok.encode(SENTENCES[2]))


def test_hf_ids_equal_transformers_auto_tokenizer(bpe_dir):
  transformers = pytest.importorskip("transformers")
  reference = transformers.AutoTokenizer.from_pretrained(str(bpe_dir))
  tok = tokenizer_lib.HFTokenizer(str(bpe_dir))
  assert len(reference) == tok.vocab_size
  assert (reference.bos_token_id, reference.eos_token_id, reference.pad_token_id) == (
      tok.bos_id, tok.eos_id, tok.pad_id)
  for sentence in SENTENCES:
    want = reference.encode(sentence, add_special_tokens=False)
    np.testing.assert_array_equal(tok.encode(sentence), want)
    assert tok.decode(want) == reference.decode(want, skip_special_tokens=True)


def test_hf_ids_from_model_config(tmp_path):
  """Without tokenizer_config.json the ids come from config.json (eos a list, as Llama 3's)
  and generation_config.json; the first eos is the one encode appends."""
  folder = _train_bpe(tmp_path / "m", config=False)
  bare = tokenizer_lib.HFTokenizer(str(folder))
  assert (bare.pad_id, bare.bos_id, bare.eos_id, bare.eos_ids) == (None, None, None, ())
  with pytest.raises(ValueError, match="add_bos=True but this tokenizer has no bos"):
    bare.encode("hi", add_bos=True)
  (folder / "config.json").write_text(json.dumps(
      {"bos_token_id": 1, "eos_token_id": [2, 7], "pad_token_id": None}))
  (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": [7, 9]}))
  tok = tokenizer_lib.HFTokenizer(str(folder))
  assert (tok.bos_id, tok.eos_id, tok.eos_ids, tok.pad_id) == (1, 2, (2, 7, 9), None)
  assert tok.encode("hi", add_bos=True, add_eos=True)[[0, -1]].tolist() == [1, 2]
  # tokenizer_config.json wins for the first eos; config.json's ids follow.
  (folder / "special_tokens_map.json").write_text(json.dumps({"eos_token": "<pad>"}))
  assert tokenizer_lib.HFTokenizer(str(folder)).eos_ids == (0, 2, 7, 9)
  (folder / "special_tokens_map.json").write_text(json.dumps({"eos_token": "<eot>"}))
  with pytest.raises(ValueError, match="eos_token '<eot>' .* is not in the vocabulary"):
    tokenizer_lib.HFTokenizer(str(folder))
  # An explicit null (Qwen's "bos_token": null) means no bos, whatever config.json says.
  (folder / "special_tokens_map.json").unlink()
  (folder / "tokenizer_config.json").write_text(json.dumps({"bos_token": None,
                                                            "pad_token": None}))
  tok = tokenizer_lib.HFTokenizer(str(folder))
  assert (tok.bos_id, tok.pad_id, tok.eos_id) == (None, None, 2)


@pytest.mark.parametrize("sentence", ASCII + ["", "the fox"])
def test_sentencepiece_round_trip_and_specials(sp_dir, sentence):
  tok = tokenizer_lib.SentencePieceTokenizer(str(sp_dir / "tokenizer.model"))
  assert (tok.bos_id, tok.eos_id, tok.eos_ids, tok.pad_id) == (1, 2, (2,), None)
  assert tok.vocab_size == 60
  ids = tok.encode(sentence)
  assert ids.dtype == np.int32 and not np.isin(ids, [1, 2]).any()
  assert ids.size == 0 or ids.max() < 60
  assert tok.decode(ids) == sentence
  framed = tok.encode(sentence, add_bos=True, add_eos=True)
  assert framed[0] == 1 and framed[-1] == 2
  np.testing.assert_array_equal(framed[1:-1], ids)
  assert tok.decode(framed) == sentence
  clone = pickle.loads(pickle.dumps(tok))
  np.testing.assert_array_equal(clone.encode(sentence), ids)


def test_sentencepiece_with_a_pad_piece(tmp_path):
  tok = tokenizer_lib.SentencePieceTokenizer(
      str(_train_sentencepiece(tmp_path / "pad", pad_id=3)))
  assert (tok.bos_id, tok.eos_id, tok.pad_id) == (1, 2, 3)
  ids = tok.encode(ASCII[0], add_eos=True)
  assert tok.decode(np.concatenate([ids, [3, 3]])) == ASCII[0]


def test_load_tokenizer_dispatch(bpe_dir, sp_dir, tmp_path):
  assert isinstance(tokenizer_lib.load_tokenizer(None), tokenizer_lib.ByteTokenizer)
  assert isinstance(tokenizer_lib.load_tokenizer("byte"), tokenizer_lib.ByteTokenizer)
  assert isinstance(tokenizer_lib.load_tokenizer(str(bpe_dir)), tokenizer_lib.HFTokenizer)
  assert isinstance(tokenizer_lib.load_tokenizer(bpe_dir / "tokenizer.json"),
                    tokenizer_lib.HFTokenizer)
  assert isinstance(tokenizer_lib.load_tokenizer(str(sp_dir)),
                    tokenizer_lib.SentencePieceTokenizer)
  assert isinstance(tokenizer_lib.load_tokenizer(str(sp_dir / "tokenizer.model")),
                    tokenizer_lib.SentencePieceTokenizer)
  both = _train_bpe(tmp_path / "both")  # tokenizer.json wins over tokenizer.model
  (both / "tokenizer.model").write_bytes((sp_dir / "tokenizer.model").read_bytes())
  assert isinstance(tokenizer_lib.load_tokenizer(str(both)), tokenizer_lib.HFTokenizer)


def test_load_tokenizer_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match="holds neither tokenizer.json nor tokenizer.model"):
    tokenizer_lib.load_tokenizer(str(tmp_path))
  with pytest.raises(FileNotFoundError, match="neither 'byte' nor an existing path"):
    tokenizer_lib.load_tokenizer("llama-3-8b")
  (tmp_path / "vocab.txt").write_text("a\nb\n")
  with pytest.raises(ValueError, match=r"unknown kind; expected a tokenizer.json \(\*.json\)"):
    tokenizer_lib.load_tokenizer(str(tmp_path / "vocab.txt"))
  (tmp_path / "bad.json").write_text("{}")
  with pytest.raises(ValueError, match="is not a Hugging Face tokenizer.json"):
    tokenizer_lib.load_tokenizer(str(tmp_path / "bad.json"))
  (tmp_path / "bad.model").write_bytes(b"not a model")
  with pytest.raises(ValueError, match="is not a SentencePiece model"):
    tokenizer_lib.load_tokenizer(str(tmp_path / "bad.model"))
  with pytest.raises(FileNotFoundError, match="no tokenizer file at"):
    tokenizer_lib.HFTokenizer(str(tmp_path / "missing.json"))


def test_text_source_uses_the_real_tokenizer(bpe_dir, tmp_path):
  tok = tokenizer_lib.load_tokenizer(str(bpe_dir))
  (tmp_path / "a.txt").write_text(SENTENCES[0], encoding="utf-8")
  (tmp_path / "b.txt").write_text(SENTENCES[2], encoding="utf-8")
  source = text.text_file_source(str(tmp_path / "*.txt"), tokenizer=tok)
  for index, sentence in enumerate((SENTENCES[0], SENTENCES[2])):
    example = source[index]
    ids = np.concatenate([example["inputs"][:1], example["targets"]])
    np.testing.assert_array_equal(ids, tok.encode(sentence, add_bos=True, add_eos=True))
    assert not np.array_equal(ids, tokenizer_lib.ByteTokenizer().encode(
        sentence, add_bos=True, add_eos=True))
  # A tokenizer without bos: documents are framed with eos only; asking for bos is an error.
  bare = tokenizer_lib.HFTokenizer(str(_train_bpe(tmp_path / "bare", config=False)))
  bare.eos_id, bare.eos_ids = 2, (2,)
  example = text.TokenizedTextSource([SENTENCES[1]], tokenizer=bare)[0]
  ids = np.concatenate([example["inputs"][:1], example["targets"]])
  np.testing.assert_array_equal(ids, bare.encode(SENTENCES[1], add_eos=True))
  with pytest.raises(ValueError, match="add_bos=True but the tokenizer"):
    text.TokenizedTextSource([SENTENCES[1]], tokenizer=bare, add_bos=True)


def test_text_task_with_a_tokenizer(bpe_dir, tmp_path):
  from lclm import tasks

  (tmp_path / "a.txt").write_text("\n".join(SENTENCES * 3), encoding="utf-8")
  files = str(tmp_path / "*.txt")
  assert tasks.TextTask(32, train_files=files,
                        eval_files="train").vocab_size == 259  # byte default
  task = tasks.TextTask(32, train_files=files, eval_files="train", tokenizer=str(bpe_dir))
  assert isinstance(task.tokenizer, tokenizer_lib.HFTokenizer) and task.vocab_size == 300
  batch = next(task.train_iterator(2, 0))
  inputs = batch["inputs"][batch["segment_ids"] > 0]
  assert inputs.max() < 300 and (inputs == 1).any()  # bpe ids, documents start with <s>
  assert tasks.TextTask(32, train_files=files, eval_files="train", tokenizer=str(bpe_dir),
                        vocab_size=384).vocab_size == 384
  with pytest.raises(ValueError, match=r"TextTask.vocab_size=200 must be an int >= the "
                     r"tokenizer's vocabulary \(300"):
    tasks.TextTask(32, train_files=files, eval_files="train", tokenizer=str(bpe_dir),
                   vocab_size=200)


def test_generate_uses_the_tokenizer_and_stops_on_its_eos(bpe_dir, tmp_path):
  from experiments import generate as generate_main

  text_task = types.SimpleNamespace(name="text", tokenizer=tokenizer_lib.ByteTokenizer())
  mqar_task = types.SimpleNamespace(name="mqar", tokenizer=None)
  assert generate_main.tokenizer_for(text_task) is text_task.tokenizer
  assert generate_main.tokenizer_for(mqar_task) is None
  tok = generate_main.tokenizer_for(mqar_task, str(bpe_dir))
  assert isinstance(tok, tokenizer_lib.HFTokenizer)
  with pytest.raises(generate_main.PromptError, match="--tokenizer: .*neither 'byte'"):
    generate_main.tokenizer_for(text_task, str(tmp_path / "missing"))
  args = types.SimpleNamespace(prompt=SENTENCES[1], prompt_file=None, prompt_tokens=None)
  prompt = generate_main.encode_prompt(args, tok, 300)
  np.testing.assert_array_equal(prompt, tok.encode(SENTENCES[1], add_bos=True))
  with pytest.raises(generate_main.PromptError, match="outside the model's vocabulary"):
    generate_main.encode_prompt(args, tok, 259)
  assert generate_main.stop_ids(None, tok, 300) == (2,)
  assert generate_main.stop_ids(None, None, 300) == ()
  assert generate_main.stop_ids("", tok, 300) == ()
  assert generate_main.stop_ids("5, 6", tok, 300) == (5, 6)
  with pytest.raises(generate_main.PromptError, match="--stop_tokens"):
    generate_main.stop_ids("5,x", tok, 300)
