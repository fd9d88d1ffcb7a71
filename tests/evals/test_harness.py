"""The lm-evaluation-harness adapter (lclm.evals.harness) on a tiny byte-level run directory:
its numbers against a direct computation with the model (loglikelihood, is_greedy, rolling
windows, generation through lclm.inference.generate), two local harness tasks end to end (no
network), lm-eval's CLI through ``python -m lclm.evals.harness``, and its errors."""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import runpy
import shutil
import sys
import warnings

import gin
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

lm_eval = pytest.importorskip("lm_eval")

from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.api.registry import get_model  # noqa: E402

from lclm.data import tokenizer as tokenizer_lib  # noqa: E402
from lclm.evals import harness, loading  # noqa: E402
from lclm.evals.harness import LclmLM  # noqa: E402
from lclm.inference import generate  # noqa: E402
from lclm.model import DecoderLM  # noqa: E402
from lclm.training import checkpointing, step  # noqa: E402

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "harness")
BOS, EOS = 1, 2
MAX_LENGTH = 64
BATCH = 4
MODEL_CONFIG = """\
DecoderLM.features = 32
DecoderLM.mlp_hidden_features = 64
DecoderLM.layer_pattern = ["attention", "attention"]
DecoderLM.mixer_options = {"attention": {"num_heads": 2}}
DecoderLM.position_options = {"rope_theta": 10000.0, "rope_scaling": None}
"""
PASSKEY = "train.task = @PasskeyTask\nPasskeyTask.seq_len = 256\n"
MQAR = "train.task = @MqarTask\nMqarTask.seq_len = 64\nMqarTask.vocab_size = 259\n"
# Generation prompts of 17 to 25 byte tokens (with bos), like the generation task's: every
# batch compiles to the same shapes (prefill width 32, cache 32, 8 steps).
PROMPTS = ["Q: Name a colour.\nA:", "Q: Opposite of up?\nA:", "Tell me a story:",
           "Q: Capital of Peru?\nA:", "Once upon a time,"]


def _ids(text: str) -> list[int]:
  """Byte-tokenizer ids of ``text``, computed here without the tokenizer."""
  return [b + 3 for b in text.encode("utf-8")]


def _req(kind, *args):
  return Instance(request_type=kind, doc={}, arguments=tuple(args), idx=0)


def _write_run(workdir, task_config: str, seed: int = 7):
  """A run directory written the way experiments.convert_hf writes one (config.gin, and an
  Orbax TrainState in checkpoints/0), its config.gin binding a training task; returns the
  model that was saved."""
  os.makedirs(workdir, exist_ok=True)
  config = os.path.join(workdir, "config.gin")
  with open(config, "w") as f:
    f.write(task_config + MODEL_CONFIG)
  loading.parse_config([config])
  model = DecoderLM(vocab_size=259, rngs=nnx.Rngs(seed))
  model.eval()
  graphdef, params = nnx.split(model, nnx.Param)
  state = step.TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=(),
                          graphdef=graphdef)
  checkpointer = checkpointing.Checkpointer(os.path.join(workdir, "checkpoints"),
                                            async_save=False)
  checkpointer.save(0, state, force=True)
  checkpointer.wait()
  checkpointer.close()
  gin.clear_config()
  return model


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  """(run directory, the in-memory model that was saved into it)."""
  workdir = str(tmp_path_factory.mktemp("passkey_run"))
  return workdir, _write_run(workdir, PASSKEY)


@pytest.fixture(scope="module")
def lm(run):
  return LclmLM(run[0], max_length=MAX_LENGTH, batch_size=BATCH, max_gen_toks=8)


@functools.partial(jax.jit, static_argnames="graphdef")
def _logits(graphdef, state, tokens):
  return nnx.merge(graphdef, state)(
      tokens, position_ids=jnp.arange(tokens.shape[1], dtype=jnp.int32)[None])


def _log_softmax(model, ids: list[int]) -> np.ndarray:
  """float64 [len(ids), vocab] log-probabilities of the next token after each of ``ids`` (the
  model runs on ids right-padded to MAX_LENGTH: causal, so the padding changes nothing)."""
  assert len(ids) <= MAX_LENGTH
  tokens = np.zeros((1, MAX_LENGTH), np.int32)
  tokens[0, :len(ids)] = ids
  logits = np.asarray(_logits(*nnx.split(model), jnp.asarray(tokens))[0, :len(ids)], np.float64)
  top = logits.max(-1, keepdims=True)
  return logits - (top + np.log(np.exp(logits - top).sum(-1, keepdims=True)))


def _score(model, ids: list[int], count: int) -> tuple[float, bool]:
  """Sum of log p of the last ``count`` tokens of ``ids`` given the ones before, and whether
  each is the argmax."""
  logprobs = _log_softmax(model, ids[:-1])
  targets = np.asarray(ids[1:])
  rows = np.arange(len(targets) - count, len(targets))
  picked = logprobs[rows, targets[rows]]
  return float(picked.sum()), bool((logprobs[rows].argmax(-1) == targets[rows]).all())


# ---- Registration and options.


def test_registered_under_lclm_and_reads_the_run(lm, run):
  assert get_model("lclm") is LclmLM
  assert lm.loaded.kind == "run" and lm.loaded.step == 0
  assert lm.max_length == MAX_LENGTH and lm.batch_size == BATCH and lm.max_gen_toks == 8
  assert lm.prefix_token_id == BOS and lm.eot_token_id == EOS
  # Defaults: the run's training length (PasskeyTask.seq_len), 256 new tokens.
  default = LclmLM(run[0])
  assert default.max_length == 256 and default.max_gen_toks == 256 and default.batch_size == 8


def test_model_args_string_and_gin_params(run):
  """lm-eval's --model_args string; gin_params (';'-separated) change the evaluated model."""
  lm = LclmLM.create_from_arg_string(
      f"workdir={run[0]},step=0,max_length=32,max_gen_toks=4,gin_params="
      "DecoderLM.final_logits_soft_cap = 0.5; DecoderLM.norm_eps = 1e-5",
      {"batch_size": "2", "max_batch_size": None, "device": None})
  assert (lm.max_length, lm.max_gen_toks, lm.batch_size) == (32, 4, 2)
  assert lm.model.final_logits_soft_cap == 0.5
  # A soft cap of 0.5 keeps the logits in [-0.5, 0.5]: log p lies within 1 of -log(259).
  (logprob, _), = lm.loglikelihood([_req("loglikelihood", "ab", "c")])
  assert abs(logprob + np.log(259)) <= 1.0 + 1e-4
  assert LclmLM(run[0], batch_size="auto").batch_size == harness.AUTO_BATCH_SIZE


# ---- Numbers against a direct computation.


def test_loglikelihood_equals_direct_log_softmax(lm, run):
  model = run[1]
  pairs = [("The sky is", " blue"), ("Answer: ", "yes"), ("", "abc"), ("x" * 70, "yz"),
           ("Hello", " there, friend")]
  got = lm.loglikelihood([_req("loglikelihood", c, x) for c, x in pairs])
  for (context, continuation), (logprob, greedy) in zip(pairs, got):
    spaces = len(context) - len(context.rstrip())  # Trailing spaces go to the continuation.
    context, continuation = context[:len(context) - spaces], context[len(context) - spaces:] + (
        continuation)
    ids = ([BOS] + _ids(context) + _ids(continuation))[-(MAX_LENGTH + 1):]
    want, want_greedy = _score(model, ids, len(_ids(continuation)))
    np.testing.assert_allclose(logprob, want, rtol=1e-5, atol=1e-4)
    assert greedy == want_greedy


def test_is_greedy_on_the_models_own_continuation(lm, run):
  model = run[1]
  ids = [BOS] + _ids("Hello")
  for _ in range(3):  # The model's greedy continuation, computed directly.
    ids.append(int(_log_softmax(model, ids)[-1].argmax()))
  context, continuation = ids[:6], ids[6:]
  wrong = continuation[:-1] + [(continuation[-1] + 1) % 259]
  (logprob, greedy), (wrong_logprob, wrong_greedy) = lm.loglikelihood_tokens(
      [(context, continuation), (context, wrong)], disable_tqdm=True)
  assert greedy and not wrong_greedy
  np.testing.assert_allclose(logprob, _score(model, ids, 3)[0], rtol=1e-5, atol=1e-4)
  assert wrong_logprob < logprob
  assert lm.loglikelihood_tokens([(context, [])]) == [(0.0, True)]


def test_loglikelihood_rolling_sums_disjoint_windows(lm, run):
  model = run[1]
  long_text = "The quick brown fox jumps over the lazy dog. " * 3 + "End."  # 139 tokens.
  short_text = "A short text."
  got_long, got_short = lm.loglikelihood_rolling(
      [_req("loglikelihood_rolling", long_text), _req("loglikelihood_rolling", short_text)])
  # Windows of MAX_LENGTH predicted tokens; each predicts tokens[start:end] from the (up to)
  # MAX_LENGTH tokens before `end` of [bos] + tokens (the last one from a full window).
  tokens = [BOS] + _ids(long_text)
  want = 0.0
  for start in range(0, len(tokens) - 1, MAX_LENGTH):
    end = min(start + MAX_LENGTH, len(tokens) - 1)
    window = tokens[max(0, end - MAX_LENGTH):end + 1]
    want += _score(model, window, end - start)[0]
  np.testing.assert_allclose(got_long, want, rtol=1e-5, atol=1e-3)
  # A text within max_length: one window, the loglikelihood of the text after bos.
  (empty_context, _), = lm.loglikelihood([_req("loglikelihood", "", short_text)])
  np.testing.assert_allclose(got_short, empty_context, rtol=1e-6, atol=1e-5)
  assert lm.loglikelihood_rolling([_req("loglikelihood_rolling", "")]) == [0.0]


def _reference_ids(model, prompts, **options) -> list[list[int]]:
  """lclm.inference.generate's 8 new tokens after [bos] + bytes of each prompt, in batches of
  BATCH rows (dummy rows repeat the batch's first prompt, as the adapter fills them)."""
  result = []
  for start in range(0, len(prompts), BATCH):
    batch = [[BOS] + _ids(p) for p in prompts[start:start + BATCH]]
    rows = batch + [batch[0]] * (BATCH - len(batch))
    tokens = np.zeros((BATCH, 32), np.int32)
    for r, ids in enumerate(rows):
      tokens[r, :len(ids)] = ids
    out = generate(model, tokens, prompt_lengths=np.array([len(r) for r in rows]),
                   max_new_tokens=8, stop_tokens=options.pop("stop_tokens", (EOS,)), **options)
    result += np.asarray(out)[:len(batch)].tolist()
  return result


def _text(ids: list[int], until=(), eos=EOS) -> str:
  """The bytes of ``ids`` before the first ``eos`` (special ids dropped), cut at the first of
  the ``until`` strings."""
  ids = ids[:ids.index(eos)] if eos in ids else ids
  text = bytes(i - 3 for i in ids if i >= 3).decode("utf-8", errors="replace")
  cuts = [text.find(u) for u in until if u and u in text]
  return text[:min(cuts)] if cuts else text


def _adapter_order(prompts):
  return sorted(prompts, key=len, reverse=True)  # Longest first, as the adapter batches.


def test_generate_until_equals_generate_decoded_and_cut(lm):
  model = lm.model  # The restored model (the saved one's equality is checked above).
  ordered = _adapter_order(PROMPTS)
  ids = dict(zip(ordered, _reference_ids(model, ordered)))
  got = lm.generate_until([_req("generate_until", p, {"max_gen_toks": 8}) for p in PROMPTS])
  assert got == [_text(ids[p]) for p in PROMPTS], got  # In the requests' order.
  assert all(got)
  # Cut at the first `until` string: a character inside the text with most plain characters.
  i = max(range(len(got)), key=lambda i: len(got[i].replace("\ufffd", "")))
  text = got[i]
  stop = next(ch for ch in text[1:] if ch != "\ufffd")
  cut = lm.generate_until([_req("generate_until", PROMPTS[i],
                                {"until": ["never there", stop], "max_gen_toks": 8})])
  assert cut == [text[:text.index(stop)]] and len(cut[0]) < len(text)
  # Stop at the tokenizer's eos: a tokenizer whose eos is a byte the model generates.
  first = ids[PROMPTS[0]]
  k = next(k for k in range(1, 8) if first[k] >= 3 and first[k] not in first[:k])

  class StopAt(tokenizer_lib.ByteTokenizer):
    eos_id = first[k]
    eos_ids = (first[k],)

  stopping = LclmLM(loaded=dataclasses.replace(lm.loaded, tokenizer=StopAt()),
                    max_length=MAX_LENGTH, batch_size=BATCH, max_gen_toks=8)
  assert stopping.generate_until([_req("generate_until", PROMPTS[0], {})]) == [
      _text(first[:k])]


def test_sampled_generation_is_seeded(run):
  options = {"do_sample": True, "temperature": 0.8, "max_gen_toks": 8}
  requests = [_req("generate_until", p, options) for p in PROMPTS[:2]]
  first = LclmLM(run[0], max_length=MAX_LENGTH, batch_size=BATCH, seed=5)
  again = LclmLM(run[0], max_length=MAX_LENGTH, batch_size=BATCH, seed=5)
  got = first.generate_until(requests)
  assert got == again.generate_until(requests)
  ordered = _adapter_order(PROMPTS[:2])
  ids = dict(zip(ordered, _reference_ids(first.model, ordered, temperature=0.8, seed=5)))
  assert got == [_text(ids[p]) for p in PROMPTS[:2]]
  # The next sampled batch of the same adapter draws with the next seed.
  ids = dict(zip(ordered, _reference_ids(first.model, ordered, temperature=0.8, seed=6)))
  assert first.generate_until(requests) == [_text(ids[p]) for p in PROMPTS[:2]]


def test_generation_options():
  lm = LclmLM.__new__(LclmLM)
  lm._max_gen_toks = 256
  assert lm.generation_options({"until": "\n"}) == {
      "until": ["\n"], "max_gen_toks": 256, "temperature": 0.0, "top_k": None, "top_p": None}
  assert lm.generation_options({"do_sample": True, "max_new_tokens": 5, "top_k": 3}) == {
      "until": [], "max_gen_toks": 5, "temperature": 1.0, "top_k": 3, "top_p": None}
  assert lm.generation_options({"temperature": 0.5})["temperature"] == 0.5
  assert lm.generation_options({"do_sample": False, "temperature": 0.5})["temperature"] == 0.0
  assert lm.generation_options({"do_sample": True, "temperature": 0})["temperature"] == 0.0
  assert lm.generation_options({"top_p": 0.9})["top_p"] is None  # Greedy: no nucleus.
  with pytest.raises(ValueError, match="temperature must be >= 0, got -1.0"):
    lm.generation_options({"temperature": -1, "do_sample": True})
  with pytest.raises(ValueError, match="'until' must be a string or a list of strings"):
    lm.generation_options({"until": 3})
  with pytest.raises(ValueError, match="max_gen_toks must be an int >= 1, got 0"):
    lm.generation_options({"max_gen_toks": 0})
  assert harness.cut_at("ab\ncd.ef", ["never", ".", "\n"]) == "ab"
  assert harness.cut_at("abc", ["", "x"]) == "abc"


# ---- Harness tasks end to end, no network.


@pytest.fixture(scope="module")
def offline():
  """Hugging Face datasets / hub offline (set before lm-eval's evaluator imports datasets, and
  on their config modules in case another test imported them first)."""
  with pytest.MonkeyPatch.context() as patch:
    patch.setenv("HF_DATASETS_OFFLINE", "1")
    patch.setenv("HF_HUB_OFFLINE", "1")
    import datasets  # pylint: disable=import-outside-toplevel
    import huggingface_hub  # pylint: disable=import-outside-toplevel

    patch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True, raising=False)
    patch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True, raising=False)
    yield


@pytest.fixture(scope="module")
def tasks_dir(tmp_path_factory, lm):
  """The task YAMLs with absolute data paths; the generation task's answers 0 and 2 are the
  model's own greedy outputs (so exact_match is 2/3 when the harness prompts as expected)."""
  folder = tmp_path_factory.mktemp("harness_tasks")
  with open(os.path.join(DATA, "gen.jsonl")) as f:
    docs = [json.loads(line) for line in f]
  outputs = lm.generate_until([
      _req("generate_until", f"Q: {d['question']}\nA:", {"until": ["\n"], "max_gen_toks": 8})
      for d in docs])
  for i in (0, 2):
    docs[i]["answer"] = outputs[i]
  assert docs[1]["answer"] != outputs[1]
  with open(folder / "gen.jsonl", "w") as f:
    f.writelines(json.dumps(d) + "\n" for d in docs)
  shutil.copy(os.path.join(DATA, "mc.jsonl"), folder / "mc.jsonl")
  for name in ("lclm_test_mc", "lclm_test_gen"):
    with open(os.path.join(DATA, name + ".yaml.template")) as f:
      text = f.read()
    text = text.replace("__DATA_DIR__", str(folder)).replace("__CACHE_DIR__",
                                                             str(folder / "cache"))
    (folder / (name + ".yaml")).write_text(text)
  return folder, docs


def _mc_accuracy(lm) -> float:
  """The multiple-choice accuracy recomputed from the adapter's own loglikelihoods."""
  with open(os.path.join(DATA, "mc.jsonl")) as f:
    docs = [json.loads(line) for line in f]
  hits = []
  for doc in docs:
    scores = lm.loglikelihood([_req("loglikelihood", f"Question: {doc['question']}\nAnswer:",
                                    " " + choice) for choice in doc["choices"]],
                              disable_tqdm=True)
    hits.append(int(np.argmax([s for s, _ in scores])) == doc["answer"])
  return float(np.mean(hits))


@functools.lru_cache(maxsize=1)
def _task_manager_class():
  from lm_eval.tasks import TaskManager  # pylint: disable=import-outside-toplevel

  return TaskManager


def test_simple_evaluate_on_local_tasks(lm, tasks_dir, offline):
  folder, docs = tasks_dir
  from lm_eval import simple_evaluate  # pylint: disable=import-outside-toplevel

  manager = _task_manager_class()(include_path=str(folder), include_defaults=False)
  results = simple_evaluate(model=lm, tasks=["lclm_test_mc", "lclm_test_gen"],
                            task_manager=manager, bootstrap_iters=0, log_samples=True,
                            torch_random_seed=None)
  mc, gen = results["results"]["lclm_test_mc"], results["results"]["lclm_test_gen"]
  assert mc["acc,none"] == pytest.approx(_mc_accuracy(lm))
  assert gen["exact_match,none"] == pytest.approx(2 / 3)
  # The logged generations are the adapter's own for the same prompts.
  for sample in results["samples"]["lclm_test_gen"]:
    doc = docs[sample["doc_id"]]
    own = lm.generate_until([_req("generate_until", f"Q: {doc['question']}\nA:",
                                  {"until": ["\n"], "max_gen_toks": 8})])
    assert sample["filtered_resps"] == own


def test_command_line_entry_point(run, tasks_dir, offline, monkeypatch, capsys):
  """``python -m lclm.evals.harness --model lclm ...`` runs lm-eval's CLI with the model
  registered (lm-eval's built-in task index is skipped to keep the test fast)."""
  folder, _ = tasks_dir
  manager = _task_manager_class()
  monkeypatch.setattr(manager, "__init__",
                      functools.partialmethod(manager.__init__, include_defaults=False))
  monkeypatch.setattr(sys, "argv", [
      "harness", "--model", "lclm", "--model_args",
      f"workdir={run[0]},max_length={MAX_LENGTH}", "--tasks", "lclm_test_mc",
      "--include_path", str(folder), "--batch_size", str(BATCH), "--seed", "0,0,None,0"])
  with warnings.catch_warnings():  # runpy: the module is already imported (by this test).
    warnings.simplefilter("ignore", RuntimeWarning)
    runpy.run_module("lclm.evals.harness", run_name="__main__", alter_sys=True)
  out = capsys.readouterr().out
  row = next(line for line in out.splitlines() if line.startswith("|lclm_test_mc"))
  cells = [cell.strip() for cell in row.split("|")]  # Task, version, filter, shots, metric, ...
  metric = cells.index("acc")
  expected = _mc_accuracy(LclmLM(run[0], max_length=MAX_LENGTH, batch_size=BATCH))
  assert float(cells[metric + 2]) == pytest.approx(expected, abs=1e-4), out


# ---- Errors.


def test_errors(run, tmp_path, lm):
  with pytest.raises(ValueError, match="workdir is required"):
    LclmLM()
  with pytest.raises(FileNotFoundError, match="is not a directory"):
    LclmLM(str(tmp_path / "missing"))
  with pytest.raises(FileNotFoundError, match="has no config.gin"):
    LclmLM(str(tmp_path))
  with pytest.raises(ValueError, match=r"unknown model_args \['pretrained'\]"):
    LclmLM(run[0], pretrained="gpt2")
  with pytest.raises(ValueError, match="max_length must be an int >= 2, got 'long'"):
    LclmLM(run[0], max_length="long")
  with pytest.raises(ValueError, match="batch_size must be an int >= 1, got 0"):
    LclmLM(run[0], batch_size=0)
  with pytest.raises(ValueError, match="give workdir or loaded, not both"):
    LclmLM(run[0], loaded=lm.loaded)
  with pytest.raises(ValueError, match="leaves no room for a prompt within max_length=64"):
    lm.generate_until([_req("generate_until", "hi", {"max_gen_toks": 64})])
  with pytest.raises(ValueError, match="continuation of 65 tokens does not fit max_length=64"):
    lm.loglikelihood_tokens([([BOS], [5] * 65)])
  small = loading.LoadedModel(model=lm.model, vocab_size=200, tokenizer=lm.tokenizer,
                              task=None, step=0, source="x", kind="run")
  with pytest.raises(ValueError, match="beyond the model's vocabulary of 200"):
    LclmLM(loaded=small)


def test_token_id_run_needs_a_tokenizer(run, tmp_path):
  workdir = str(tmp_path / "mqar")
  shutil.copytree(run[0], workdir)
  with open(os.path.join(workdir, "config.gin"), "w") as f:
    f.write(MQAR + MODEL_CONFIG)
  with pytest.raises(ValueError, match=r"needs a text tokenizer.*'mqar'.*tokenizer=byte"):
    LclmLM(workdir)
  lm = LclmLM(workdir, tokenizer="byte", max_length=MAX_LENGTH, batch_size=BATCH)
  assert lm.max_length == MAX_LENGTH and repr(lm.tokenizer) == "ByteTokenizer()"
  (logprob, _), = lm.loglikelihood([_req("loglikelihood", "ab", "c")])
  np.testing.assert_allclose(logprob, _score(run[1], [BOS] + _ids("abc"), 1)[0], rtol=1e-5)
