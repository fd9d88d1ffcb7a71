"""KV-cache policies compared: needle accuracy, perplexity and cache memory against the budget.

    python -m experiments.kv_policies --workdir=runs/kv-passkey-256,runs/tiny-llama-hf \
        --labels=trained-here,imported-llama --lengths=256,512 --budgets=1/16,1/8,1/4,1/2 \
        [--policies=streaming_llm,h2o,snapkv,h2o_merge,quest,infllm,duo,razor] \
        [--tasks=passkey,niah_single,perplexity] [--probe_examples=32] \
        [--examples=32] [--text_examples=16] [--prefill_chunk=32] [--score_chunk=32] \
        [--spec='h2o_r4={"name": "h2o", "recent": 4}'] [--out=runs/kv_policies]

Every model (``--workdir``, repeatable or a comma list: a training run, an
``experiments.convert_hf`` directory or a Hugging Face folder, loaded with
:func:`lclm.evals.loading.load_model`) is scored with its exact decode cache and with every
policy of ``--policies`` at every budget of ``--budgets``. A budget is a fraction of the
sequence length ``L`` of ``--lengths``: ``round(fraction * L)`` cache slots per key/value head
(``{"name": ..., "budget": N}`` on every ``attention`` / ``global_attention`` layer: the
model is rebuilt with ``DecoderLM.mixer_options[...]["cache_policy"]`` and the trained
parameters; a layer that refuses the spec, e.g. sinks and recent tokens over the budget, is
reported in the cell, not raised).

Policy names (``--policies``): every name of ``layers.kv_policies.ALL_POLICIES`` (read at
run time, so new policies need no change here) maps to ``{"name": NAME}``; for an eviction
policy ``NAME_merge`` maps to ``{"name": NAME, "merge": True}``; the block-retrieval policies
(``quest``, ``infllm``: the whole cache stays, the budget is the keys a decode step reads)
get 8-key blocks and an 8-token window, so that 1/16 of 256 tokens holds a block;
``duo`` is DuoAttention's per-head budget: the retrieval-head probe
(:mod:`lclm.evals.retrieval_heads`, ``--probe_examples`` needle rows at each length, other
seeds than the scored rows) ranks the key/value heads of the ``attention`` layers, and
:func:`lclm.evals.retrieval_heads.budget_head_windows` spends the same cache as the others'
budget (budget x key/value heads slots): the best heads keep every token with
``full_share`` (0.5) of it, the rest stream (4 sinks and a window) in the other half; the
model is rebuilt with those ``per_head_windows`` (streaming heads also attend through their
window while prefilling, as in DuoAttention); the cell's spec records the heads and slots;
``razor`` is the same split with RazorAttention's compensation token on the streaming heads
(``{"name": "duo", "compensation_token": True}``: each also attends to the mean of the
tokens its window hides, :mod:`layers.compensation`; two float32 sums per streaming key/value
head on top of its slots);
``--spec LABEL=JSON`` adds a name of one's own (a dict of policy options without the
budget; ``{"name": "duo", "full_share": 0.25}`` for duo; ``{"name": "infllm", "prefill":
"retrieval", "memory_distance": 32, "window": 32}`` for InfLLM's chunked prefill and memory
positions). Unknown names exit with code 2.

What is measured, per model, policy, budget and length, all of it through the decode cache
(teacher-forced scoring never uses the cache, so it cannot see a policy):

* ``passkey`` exact match: greedy generation (:func:`lclm.training.generation_eval.
  generation_exact_match`) of the 5-digit key after the prompt, which is prefilled in chunks
  of ``--prefill_chunk`` tokens (the policy evicts after every chunk and every generated
  token); ``--examples`` keys per length, needle depth uniform
  (:func:`lclm.evals.retrieval_heads.passkey_batches`; byte tokens, vocabulary >= 259);
* ``niah_single`` exact match: RULER's single needle over the model's own token ids
  (:func:`lclm.evals.retrieval_heads.niah_batches`), the same way;
* ``perplexity``: the repository holds no natural-language corpus usable offline, so the
  text is held-out passkey rows (intro, filler sentences, the needle, the question and the
  key; other seeds than the needle examples; ``--text_examples`` rows of ``L + 1`` tokens),
  fed into the cache ``--score_chunk`` tokens at a time; each chunk's next-token NLL comes
  from the logits the model gives with the cache the policy kept of the earlier chunks
  (:func:`lclm.evals.cache_scoring.cache_nll`). Reported: mean NLL and perplexity over all
  tokens, and the mean NLL of the key digits (the part that needs the needle; they share the
  question's chunk, so each sees the kept cache plus up to ``--score_chunk`` tokens, where a
  generated digit sees the cache and itself: more lenient than exact match). A model with a
  vocabulary below 259 gets niah_single rows instead;
* memory: bytes of one row's decode cache at length ``L``
  (:func:`lclm.evals.cache_scoring.cache_bytes_per_row`: keys, values and the policy's
  bookkeeping) and their ratio to the exact cache.

``--out`` (default ``runs/kv_policies``) gets ``results.json`` (every cell, the settings, the
hash of ``layers/kv_policies.py`` and provenance: :func:`lclm.provenance.collect`),
``table.md`` (one row per model x policy x budget) and ``kv_policies.png`` (accuracy,
perplexity and memory against the budget fraction, one line per policy and length, the
exact cache as horizontal lines); ``--report=DIR`` rewrites the last two from
``DIR/results.json``. Exit codes: 0 done, 2 bad arguments or a model that cannot be loaded.

The two models of the README's measurements (CPU, 15 to 17 minutes of training each on a
busy 2-core machine):

    # (a) trained here: the quickstart's tiny attention model on passkey at 256 tokens.
    python -m experiments.train --gin_file=configs/experiments/kv_policies_passkey.gin \
        --workdir=runs/kv-passkey-256
    # (b) imported: the README's tiny-Llama recipe (a random Hugging Face Llama trained on
    #     passkey at 256 by lclm, exported, converted back) stands in for a published model.
    python -c "import transformers as t; t.LlamaForCausalLM(t.LlamaConfig(vocab_size=259, \
      hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, \
      num_key_value_heads=2, max_position_embeddings=256)).save_pretrained('runs/tiny-random-hf')"
    python -m experiments.convert_hf --hf_dir=runs/tiny-random-hf --workdir=runs/tiny-random
    python -m experiments.train --gin_file=runs/tiny-random/model.gin \
        --gin_file=configs/experiments/pretrain_passkey_256.gin \
        --gin_param='train.init_from="runs/tiny-random"' --workdir=runs/tiny-256
    python -m experiments.convert_hf --to_hf --workdir=runs/tiny-256 \
        --hf_dir=runs/tiny-llama-hf --architecture=llama
    # runs/tiny-llama-hf is read as a Hugging Face folder (lclm.hf.load_pretrained); its
    # experiments.convert_hf conversion (runs/converted) gives the same model.
"""

from __future__ import annotations

import argparse
import fractions
import hashlib
import json
import math
import os
import sys
import time

import numpy as np

DEFAULT_POLICIES = "streaming_llm,h2o,snapkv,h2o_merge,quest,infllm,duo,razor"
RETRIEVAL_POLICIES = ("quest", "infllm")  # layers.kv_retrieval: the budget is keys read.
# Per-head budgets (DuoAttention): retrieval heads keep every token, the others stream; the
# heads come from the retrieval-head probe. Not a cache_policy: per_head_windows options.
DUO = "duo"
DUO_OPTIONS = ("name", "full_share", "num_sink_tokens", "compensation_token")
RAZOR = "razor"  # duo's split, the streaming heads with RazorAttention's compensation token.
DUO_MIXER = "attention"  # The mixer that takes per_head_windows.
DEFAULT_BUDGETS = "1/16,1/8,1/4,1/2"
DEFAULT_LENGTHS = "256,512"
TASKS = ("passkey", "niah_single", "perplexity")
NEEDLE_TASKS = ("passkey", "niah_single")
POLICY_MIXERS = ("attention", "global_attention")  # The mixers that take cache_policy.
BYTE_VOCAB = 259  # lclm.data.tokenizer.ByteTokenizer().vocab_size
EXACT = "exact"
ANSWER_LABEL = "key NLL"  # Table columns of the perplexity rows' answer tokens.
POLICIES_FILE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                             "layers", "kv_policies.py")


class UsageError(ValueError):
  """Bad command-line input (exit code 2)."""


def _parser():
  parser = argparse.ArgumentParser(
      prog="python -m experiments.kv_policies",
      description="KV-cache policies against the budget: needle exact match by generation, "
                  "perplexity through the cache, cache memory.")
  parser.add_argument("--workdir", action="append", default=[],
                      help="run directory, converted checkpoint or Hugging Face folder; "
                           "repeatable or comma-separated")
  parser.add_argument("--labels", default=None,
                      help="comma-separated names of the models (default: folder names)")
  parser.add_argument("--out", default="runs/kv_policies", help="output directory")
  parser.add_argument("--report", default=None,
                      help="only rewrite table.md and kv_policies.png of this output "
                           "directory from its results.json (no model is run)")
  parser.add_argument("--policies", default=DEFAULT_POLICIES,
                      help=f"comma-separated policy names (default {DEFAULT_POLICIES})")
  parser.add_argument("--spec", action="append", default=[],
                      help='extra policy NAME=JSON, e.g. h2o_r4=\'{"name": "h2o", "recent": 4}\' '
                           "(options without the budget); NAME then counts as a policy")
  parser.add_argument("--budgets", default=DEFAULT_BUDGETS,
                      help="comma-separated budget fractions of the length, e.g. 1/16,0.25 "
                           f"(default {DEFAULT_BUDGETS})")
  parser.add_argument("--lengths", default=DEFAULT_LENGTHS,
                      help=f"comma-separated sequence lengths (default {DEFAULT_LENGTHS})")
  parser.add_argument("--tasks", default=",".join(TASKS),
                      help=f"comma-separated subset of {','.join(TASKS)}")
  parser.add_argument("--examples", type=int, default=32, help="needle examples per length")
  parser.add_argument("--text_examples", type=int, default=16,
                      help="perplexity rows per length")
  parser.add_argument("--batch_size", type=int, default=32, help="rows per generation call")
  parser.add_argument("--prefill_chunk", type=int, default=32,
                      help="prompt tokens per prefill call of generation")
  parser.add_argument("--score_chunk", type=int, default=32,
                      help="tokens per cache call of the perplexity scorer")
  parser.add_argument("--num_digits", type=int, default=5, help="digits of the pass key")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--step", type=int, default=None,
                      help="checkpoint step of the run directories (default newest)")
  parser.add_argument("--gin_param", action="append", default=[],
                      help="extra gin binding applied over each run's config.gin")
  parser.add_argument("--probe_examples", type=int, default=32,
                      help="needle rows of the retrieval-head probe that picks duo's heads")
  return parser


def _split(values) -> list[str]:
  if isinstance(values, str):
    values = [values]
  return [part.strip() for value in values for part in value.split(",") if part.strip()]


def parse_budgets(text: str) -> list[fractions.Fraction]:
  """Sorted distinct fractions in (0, 1] of ``--budgets`` ("1/16", "0.25")."""
  budgets = set()
  for part in _split(text):
    try:
      value = fractions.Fraction(part).limit_denominator(1 << 16)
    except (ValueError, ZeroDivisionError):
      raise UsageError(f"--budgets: {part!r} is not a fraction such as 1/16 or 0.25.") from None
    if not 0 < value <= 1:
      raise UsageError(f"--budgets: each fraction must lie in (0, 1], got {part}.")
    budgets.add(value)
  if not budgets:
    raise UsageError(f"--budgets names no fraction: {text!r}.")
  return sorted(budgets)


def parse_lengths(text: str, tasks, num_digits: int) -> list[int]:
  from lclm.data import passkey  # pylint: disable=import-outside-toplevel

  try:
    lengths = sorted({int(part) for part in _split(text)})
  except ValueError:
    raise UsageError(f"--lengths must be comma-separated ints, got {text!r}.") from None
  if not lengths or lengths[0] < 2:
    raise UsageError(f"--lengths must name lengths >= 2, got {text!r}.")
  shortest = passkey.min_seq_len(num_digits)
  if ("passkey" in tasks or "perplexity" in tasks) and lengths[0] < shortest:
    raise UsageError(f"--lengths: {lengths[0]} cannot hold a passkey prompt with "
                     f"{num_digits}-digit keys (passkey and the perplexity text); use lengths "
                     f">= {shortest}.")
  return lengths


def budget_tokens(fraction: fractions.Fraction, length: int) -> int:
  """Cache slots of a budget ``fraction`` of ``length`` tokens (at least 1)."""
  return max(1, int(round(fraction * length)))


def spec_builders(available, extra_specs=()) -> dict[str, dict]:
  """Policy name -> spec without the budget: ``NAME`` and ``NAME_merge`` for every name of
  ``available`` (``layers.kv_policies.ALL_POLICIES``; block retrieval: ``NAME`` only, with
  8-key blocks and an 8-token window), plus ``--spec LABEL=JSON`` entries."""
  builders = {DUO: {"name": DUO, "full_share": 0.5, "num_sink_tokens": 4}}
  builders[RAZOR] = {**builders[DUO], "compensation_token": True}
  for name in available:
    if name in RETRIEVAL_POLICIES:  # Blocks small enough for a 1/16 budget at 256 tokens.
      builders[name] = {"name": name, "block_size": 8, "window": 8}
      continue
    builders[name] = {"name": name}
    builders[f"{name}_merge"] = {"name": name, "merge": True}
  for entry in extra_specs:
    label, sep, text = entry.partition("=")
    label = label.strip()
    if not sep or not label:
      raise UsageError(f"--spec must be NAME=JSON, got {entry!r}.")
    try:
      spec = json.loads(text)
    except json.JSONDecodeError as error:
      raise UsageError(f"--spec {label}: bad JSON ({error}): {text!r}.") from None
    if not isinstance(spec, dict) or spec.get("name") not in (*available, DUO):
      raise UsageError(f"--spec {label}: a dict whose 'name' is one of {[*available, DUO]}, "
                       f"got {text!r}.")
    if spec["name"] == DUO and set(spec) - set(DUO_OPTIONS):
      raise UsageError(f"--spec {label}: duo takes {list(DUO_OPTIONS[1:])}, got {text!r}.")
    if "budget" in spec:
      raise UsageError(f"--spec {label}: leave out the budget (it comes from --budgets).")
    builders[label] = spec
  return builders


def parse_policies(text: str, builders: dict[str, dict], available) -> list[str]:
  names = list(dict.fromkeys(_split(text)))
  unknown = [n for n in names if n not in builders]
  if unknown:
    raise UsageError(f"--policies: unknown or unavailable {unknown}; available: "
                     f"{sorted(builders)} (layers.kv_policies.ALL_POLICIES = {list(available)}, "
                     f"NAME_merge for merging, {DUO} for per-head budgets, {RAZOR} with "
                     "compensation tokens, --spec for others).")
  return names


def _check_args(args) -> None:
  for name in ("examples", "text_examples", "batch_size", "prefill_chunk", "score_chunk",
               "num_digits", "probe_examples"):
    if getattr(args, name) < 1:
      raise UsageError(f"--{name} must be a positive int, got {getattr(args, name)}.")
  if args.seed < 0:
    raise UsageError(f"--seed must be >= 0, got {args.seed}.")
  args.workdirs = _split(args.workdir)
  if not args.workdirs:
    raise UsageError("--workdir names no model (a run directory, a converted checkpoint or a "
                     "Hugging Face folder).")
  for workdir in args.workdirs:
    if not os.path.isdir(workdir):
      raise UsageError(f"--workdir {workdir} is not a directory (a training run, a converted "
                       "checkpoint or a Hugging Face folder).")
  if args.labels is None:
    labels = [os.path.basename(os.path.normpath(w)) for w in args.workdirs]
  else:
    labels = _split(args.labels)
  if len(labels) != len(args.workdirs) or len(set(labels)) != len(labels):
    raise UsageError(f"--labels must give one distinct name per model ({len(args.workdirs)}), "
                     f"got {labels}.")
  args.model_labels = labels
  args.task_list = list(dict.fromkeys(_split(args.tasks)))
  unknown = sorted(set(args.task_list) - set(TASKS))
  if unknown or not args.task_list:
    raise UsageError(f"--tasks: a non-empty subset of {list(TASKS)}, unknown {unknown}.")


def policies_file_hash(path: str = POLICIES_FILE) -> str | None:
  """sha256 of ``layers/kv_policies.py`` (call it when the module is imported): which version
  of the policies was measured."""
  try:
    with open(path, "rb") as f:
      return hashlib.sha256(f.read()).hexdigest()
  except OSError:
    return None


class ModelUnderTest:
  """A loaded model and a way to rebuild it with a cache policy on its full-attention layers.

  The rebuilt model has the loaded parameters: a policy changes static options only.
  """

  def __init__(self, loaded, builder, mixer_options, layer_options=None):
    self.loaded = loaded
    self._builder = builder  # (mixer_options, layer_options) -> a DecoderLM (abstract is fine)
    self._mixer_options = mixer_options
    self._layer_options = dict(layer_options or {})
    self.policy_mixers = [m for m in POLICY_MIXERS if m in loaded.model.layer_pattern]

  @classmethod
  def load(cls, workdir: str, *, step=None, gin_params=()):
    """Loads ``workdir``; the builder keeps a copy of the run's ``DecoderLM`` bindings, so
    it rebuilds this model after gin is cleared or another model is loaded."""
    from flax import nnx  # pylint: disable=import-outside-toplevel

    from experiments import train as train_main  # pylint: disable=import-outside-toplevel
    from lclm.evals import loading  # pylint: disable=import-outside-toplevel
    from lclm.model import DecoderLM  # pylint: disable=import-outside-toplevel

    loaded = loading.load_model(workdir, step=step, gin_params=gin_params,
                                search_paths=[train_main.REPO_ROOT])
    if loaded.kind == "hf":
      from lclm import hf  # pylint: disable=import-outside-toplevel
      options = hf.model_options(hf.read_config(workdir))
      mixer_options = dict(options.pop("mixer_options") or {})
      layer_options = dict(options.pop("layer_options", None) or {})
      builder = lambda mo, lo: DecoderLM(**options, mixer_options=mo, layer_options=lo,
                                         rngs=nnx.Rngs(0))
    else:
      import copy  # pylint: disable=import-outside-toplevel

      import gin  # pylint: disable=import-outside-toplevel
      # The run's bindings with their references and macros resolved, as gin would call.
      bindings = copy.deepcopy(gin.get_bindings(DecoderLM))
      mixer_options = dict(bindings.pop("mixer_options", None) or {})
      layer_options = dict(bindings.pop("layer_options", None) or {})
      vocab = loaded.vocab_size
      builder = lambda mo, lo: DecoderLM(vocab_size=vocab, **bindings, mixer_options=mo,
                                         layer_options=lo, rngs=nnx.Rngs(0))
    return cls(loaded, builder, mixer_options, layer_options)

  def _rebuilt(self, mixer_options, layer_options):
    """The model with other static options and the loaded parameters, in eval mode."""
    from flax import nnx  # pylint: disable=import-outside-toplevel

    abstract = nnx.eval_shape(lambda: self._builder(mixer_options, layer_options))
    model = nnx.merge(nnx.graphdef(abstract), nnx.state(self.loaded.model))
    model.eval()
    return model

  def with_policy(self, spec: dict | None):
    """The model with ``cache_policy=spec`` on every full-attention mixer (None: the loaded
    model). Raises ValueError when a layer refuses the spec or no layer takes it."""
    if spec is None:
      return self.loaded.model
    if not self.policy_mixers:
      raise ValueError(f"the model has no {'/'.join(POLICY_MIXERS)} layer to take a cache "
                       f"policy (layer pattern {list(self.loaded.model.layer_pattern)}).")
    options = {name: dict(value) for name, value in self._mixer_options.items()}
    for mixer in self.policy_mixers:
      options[mixer] = {**options.get(mixer, {}), "cache_policy": dict(spec)}
    return self._rebuilt(options, self._layer_options)

  def duo_layers(self) -> list[int]:
    """The layers whose mixer takes DuoAttention's ``per_head_windows``."""
    return [i for i, m in enumerate(self.loaded.model.layer_pattern) if m == DUO_MIXER]

  def with_head_budget(self, head_budget, compensation_token: bool = False):
    """The model with the per-head windows of ``head_budget`` (a
    :class:`lclm.evals.retrieval_heads.HeadBudget`) over its own layer options; with
    ``compensation_token``, RazorAttention's token on the layers that have streaming heads."""
    layer_options = {key: dict(value) for key, value in self._layer_options.items()}
    for layer, options in head_budget.layer_options().items():
      if compensation_token and any(w is not None for w in options["per_head_windows"]):
        options = {**options, "compensation_token": True}
      layer_options[layer] = {**layer_options.get(layer, {}), **options}
    return self._rebuilt(self._mixer_options, layer_options)


def _text_rows(loaded, length: int, args) -> dict[str, np.ndarray]:
  """The perplexity text: ``tokens`` int32 [rows, length + 1] and ``answer`` bool [rows,
  length] (the targets that are key digits / needle values)."""
  from lclm.evals import retrieval_heads as probe  # pylint: disable=import-outside-toplevel

  seed = args.seed + 7919 + length  # Other rows than the needle examples.
  if loaded.vocab_size >= BYTE_VOCAB:
    batches = probe.passkey_batches(length, num_examples=args.text_examples,
                                    batch_size=args.text_examples, seed=seed,
                                    num_digits=args.num_digits)
    source = "passkey rows"
  else:
    batches = probe.niah_batches(length, vocab_size=loaded.vocab_size,
                                 num_examples=args.text_examples,
                                 batch_size=args.text_examples, seed=seed)
    source = "niah_single rows"
  batch = batches[0]
  tokens = np.concatenate([batch["inputs"], batch["targets"][:, -1:]], axis=1)
  return {"tokens": tokens.astype(np.int32), "answer": batch["loss_mask"] > 0,
          "source": source}


def _needle_batches(task: str, loaded, length: int, args):
  from lclm.evals import retrieval_heads as probe  # pylint: disable=import-outside-toplevel

  if task == "passkey":
    if loaded.vocab_size < BYTE_VOCAB:
      raise ValueError(f"the vocabulary ({loaded.vocab_size}) is below the {BYTE_VOCAB} byte "
                       "tokens of the passkey task")
    return probe.passkey_batches(length, num_examples=args.examples,
                                 batch_size=args.batch_size, seed=args.seed + length,
                                 num_digits=args.num_digits)
  return probe.niah_batches(length, vocab_size=loaded.vocab_size, num_examples=args.examples,
                            batch_size=args.batch_size, seed=args.seed + length)


def _probe_scores(mut: ModelUnderTest, length: int, args):
  """float [layers, heads]: the retrieval-head probe's copy-paste scores of the loaded model
  on ``--probe_examples`` needle rows of ``length`` tokens (other seeds than the scored
  rows): which heads DuoAttention keeps whole."""
  from lclm.evals import retrieval_heads as probe  # pylint: disable=import-outside-toplevel

  loaded, seed = mut.loaded, args.seed + 104729 + length
  rows = dict(num_examples=args.probe_examples,
              batch_size=min(args.probe_examples, args.batch_size), seed=seed)
  if loaded.vocab_size >= BYTE_VOCAB:
    batches = probe.passkey_batches(length, num_digits=args.num_digits, **rows)
  else:
    batches = probe.niah_batches(length, vocab_size=loaded.vocab_size, **rows)
  return probe.retrieval_scores(loaded.model, batches)


def duo_model(mut: ModelUnderTest, spec: dict, scores, length: int, budget: int):
  """DuoAttention at ``budget`` slots per key/value head: the model and the spec it ran
  (the options, the heads kept whole and the streaming heads' slots). Raises ValueError when
  the model has no layer to configure or the budget cannot be split."""
  from lclm.evals import retrieval_heads as probe  # pylint: disable=import-outside-toplevel

  layers = mut.duo_layers()
  if not layers:
    raise ValueError(f"the model has no {DUO_MIXER!r} layer to take per_head_windows (layer "
                     f"pattern {list(mut.loaded.model.layer_pattern)}).")
  blocks = mut.loaded.model.layer_blocks()
  kv_heads = {blocks[i].mixer.num_kv_heads for i in layers}
  if len(kv_heads) != 1:
    raise ValueError(f"duo: the {DUO_MIXER!r} layers differ in num_kv_heads ({kv_heads}).")
  head_budget = probe.budget_head_windows(
      scores, num_kv_heads=kv_heads.pop(), length=length, budget=budget,
      full_share=spec.get("full_share", 0.5), num_sink_tokens=spec.get("num_sink_tokens", 4),
      layers=layers)
  ran = {**spec, "budget": budget,
         "full_kv_heads": [list(pair) for pair in head_budget.full_kv_heads],
         "streaming_slots": head_budget.streaming_slots,
         "streaming_sinks": head_budget.num_sink_tokens}
  return mut.with_head_budget(head_budget, bool(spec.get("compensation_token", False))), ran


def _score_cell(model, data, length: int, args) -> dict:
  """Scores of one model variant at one length (tasks whose data could not be built are
  left out)."""
  from lclm.evals import cache_scoring  # pylint: disable=import-outside-toplevel
  from lclm.training import generation_eval  # pylint: disable=import-outside-toplevel

  cell = {}
  for task in NEEDLE_TASKS:
    if task in data:
      counts = generation_eval.ExactMatchCounts()
      for batch in data[task]:
        counts += generation_eval.generation_exact_match(
            model, batch, prefill_chunk_size=args.prefill_chunk)
      cell[task] = {"exact_match": counts.exact_match, "token_accuracy": counts.token_accuracy,
                    "answers": counts.spans}
  if "perplexity" in data:
    text = data["perplexity"]
    nll = cache_scoring.cache_nll(model, text["tokens"], chunk_size=args.score_chunk)
    mean = float(nll.mean())
    answer = text["answer"]
    cell["perplexity"] = {"nll": mean, "perplexity": math.exp(mean),
                          "answer_nll": float(nll[answer].mean()) if answer.any() else None,
                          "tokens": int(nll.size)}
  return cell


def _prepare_data(loaded, lengths, args) -> tuple[dict, dict]:
  """Per length, the batches of each task; and the reasons of tasks skipped."""
  data, skipped = {}, {}
  for length in lengths:
    data[length] = {}
    for task in args.task_list:
      try:
        if task == "perplexity":
          data[length][task] = _text_rows(loaded, length, args)
        else:
          data[length][task] = _needle_batches(task, loaded, length, args)
      except ValueError as error:
        skipped.setdefault(task, {})[str(length)] = str(error)
  return data, skipped


def evaluate_model(mut: ModelUnderTest, label: str, lengths, budgets, policies, builders,
                   args) -> dict:
  """Every cell of one model: the exact cache and each policy x budget, at every length."""
  from lclm.evals import cache_scoring  # pylint: disable=import-outside-toplevel

  loaded = mut.loaded
  data, skipped = _prepare_data(loaded, lengths, args)
  for task, reasons in skipped.items():
    print(f"note: {label}: {task} skipped at {sorted(reasons)}: "
          f"{next(iter(reasons.values()))}", file=sys.stderr)
  exact_bytes = {n: cache_scoring.cache_bytes_per_row(loaded.model, n) for n in lengths}
  variants = [(EXACT, None, None)] + [(p, builders[p], b) for p in policies for b in budgets]
  probe_scores = {}  # length -> the retrieval-head scores (duo), computed once
  cells = []
  for policy, base_spec, fraction in variants:
    for length in lengths:
      cell = {"policy": policy, "length": length,
              "budget_fraction": None if fraction is None else str(fraction),
              "budget": length if fraction is None else budget_tokens(fraction, length),
              "spec": None, "exact_cache_bytes": exact_bytes[length]}
      started = time.perf_counter()
      spec = None if base_spec is None else {**base_spec, "budget": cell["budget"]}
      cell["spec"] = spec
      try:
        if spec is not None and spec["name"] == DUO:
          if length not in probe_scores:
            probe_scores[length] = _probe_scores(mut, length, args)
          model, cell["spec"] = duo_model(mut, base_spec, probe_scores[length], length,
                                          cell["budget"])
        else:
          model = mut.with_policy(spec)
      except ValueError as error:
        cell["error"] = str(error)
        print(f"   {label:>16} {policy:>14} {cell['budget_fraction'] or '1':>5} L={length}: "
              f"refused: {error}", flush=True)
        cells.append(cell)
        continue
      cell["cache_bytes"] = cache_scoring.cache_bytes_per_row(model, length)
      cell["memory_ratio"] = cell["cache_bytes"] / exact_bytes[length]
      cell.update(_score_cell(model, data[length], length, args))
      cell["seconds"] = time.perf_counter() - started
      cells.append(cell)
      summary = "  ".join(
          f"{t} {cell[t]['exact_match']:.3f}" for t in NEEDLE_TASKS if t in cell)
      if "perplexity" in cell:
        summary += f"  ppl {cell['perplexity']['perplexity']:.3f}"
      print(f"   {label:>16} {policy:>14} {cell['budget_fraction'] or '1':>5} L={length} "
            f"budget {cell['budget']:>4}: {summary}  mem {cell['memory_ratio']:.3f}  "
            f"({cell['seconds']:.1f} s)", flush=True)
  text_source = next((d["perplexity"]["source"] for d in data.values() if "perplexity" in d),
                     None)
  return {"source": os.path.abspath(loaded.source), "kind": loaded.kind, "step": loaded.step,
          "vocab_size": loaded.vocab_size, "layer_pattern": list(loaded.model.layer_pattern),
          "policy_mixers": mut.policy_mixers, "skipped_tasks": skipped,
          "perplexity_text": text_source, "cells": cells,
          "retrieval_scores": {str(n): [[round(float(x), 4) if np.isfinite(x) else None
                                         for x in row] for row in v]
                               for n, v in probe_scores.items()}}


# ------------------------------------------------------------------------------- reports

def _fmt(value, digits=3) -> str:
  if value is None or (isinstance(value, float) and math.isnan(value)):
    return "-"
  return f"{value:.{digits}f}"


def _cell_lookup(model_result: dict) -> dict:
  return {(c["policy"], c["budget_fraction"], c["length"]): c for c in model_result["cells"]}


def _variants(results: dict) -> list[tuple[str, str | None]]:
  return [(EXACT, None)] + [(p, b) for p in results["settings"]["policies"]
                            for b in results["settings"]["budgets"]]


def _present_tasks(results: dict) -> list[str]:
  tasks = []
  for task in results["settings"]["tasks"]:
    if any(task in c for m in results["models"].values() for c in m["cells"]):
      tasks.append(task)
  return tasks


def format_table(results: dict) -> str:
  """Markdown: one row per model x policy x budget; cache memory at the longest length,
  exact match per needle task and length, perplexity per length."""
  lengths = results["settings"]["lengths"]
  longest = lengths[-1]
  tasks = _present_tasks(results)
  header = ["model", "policy", "budget", "tokens", f"cache KiB/row at {longest} (x exact)"]
  for task in tasks:
    for n in lengths:
      header.append(f"{task} {'ppl' if task == 'perplexity' else 'EM'} {n}")
  if "perplexity" in tasks:
    header += [f"{ANSWER_LABEL} {n}" for n in lengths]
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  for label, model in results["models"].items():
    cells = _cell_lookup(model)
    for policy, fraction in _variants(results):
      row_cells = [cells.get((policy, fraction, n)) for n in lengths]
      if all(c is None for c in row_cells):
        continue
      last = row_cells[-1] or {}
      tokens = ",".join(str(c["budget"]) for c in row_cells if c) if fraction else "all"
      if "error" in last:
        memory = "refused"
      else:
        memory = f"{last.get('cache_bytes', 0) / 1024:.1f} ({_fmt(last.get('memory_ratio'))})"
      row = [label, policy, fraction or "1", tokens, memory]
      for task in tasks:
        for cell in row_cells:
          if cell is None or task not in cell:
            row.append("-")
          elif task == "perplexity":
            row.append(f"{cell[task]['perplexity']:.4g}")
          else:
            row.append(_fmt(cell[task]["exact_match"], 2))
      if "perplexity" in tasks:
        row += [_fmt(c["perplexity"]["answer_nll"]) if c and "perplexity" in c else "-"
                for c in row_cells]
      lines.append("| " + " | ".join(row) + " |")
  return "\n".join(lines)


def plot(results: dict, path) -> None:
  """Rows: models; columns: each task's score and the cache memory, against the budget
  fraction (log2), one line per policy (colour) and length (line style); exact cache:
  black horizontal lines."""
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  from matplotlib import pyplot as plt  # pylint: disable=import-outside-toplevel

  lengths = results["settings"]["lengths"]
  budgets = results["settings"]["budgets"]
  xs = [float(fractions.Fraction(b)) for b in budgets]
  tasks = _present_tasks(results)
  if "perplexity" in tasks:
    tasks.append("answer_nll")
  tasks.append("memory")
  models = list(results["models"].items())
  fig, axes = plt.subplots(len(models), len(tasks), figsize=(4.2 * len(tasks),
                                                             3.6 * len(models)), squeeze=False)
  styles = ["-", "--", "-.", ":"]
  colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
  ylabels = {"passkey": "passkey exact match", "niah_single": "niah_single exact match",
             "perplexity": "perplexity through the cache",
             "answer_nll": "NLL of the key digits / needle value", "memory": "cache bytes / exact"}

  titles = {"answer_nll": "key digits' NLL (perplexity rows)", "memory": "cache memory"}

  def metric(cell, task):
    if cell is None or "error" in cell:
      return math.nan
    if task == "memory":
      return cell["memory_ratio"]
    if task == "answer_nll":
      value = cell.get("perplexity", {}).get("answer_nll")
      return math.nan if value is None else value
    if task not in cell:
      return math.nan
    return cell[task]["perplexity" if task == "perplexity" else "exact_match"]

  for r, (label, model) in enumerate(models):
    cells = _cell_lookup(model)
    for c, task in enumerate(tasks):
      ax = axes[r][c]
      for li, n in enumerate(lengths):
        style = styles[li % len(styles)]
        exact = metric(cells.get((EXACT, None, n)), task)
        if not math.isnan(exact):
          ax.axhline(exact, color="black", linestyle=style, linewidth=1,
                     label=f"exact, L={n}" if c == 0 or task == "memory" else None)
        for pi, policy in enumerate(results["settings"]["policies"]):
          ys = [metric(cells.get((policy, b, n)), task) for b in budgets]
          ax.plot(xs, ys, style, marker="o", markersize=3, color=colors[pi % len(colors)],
                  label=f"{policy}, L={n}")
      ax.set_xscale("log", base=2)
      ax.set_xticks(xs, budgets)
      ax.set_xlabel("budget (fraction of the length)")
      ax.set_ylabel(ylabels[task])
      if task in NEEDLE_TASKS:
        ax.set_ylim(-0.03, 1.03)
      ax.set_title(f"{label}: {titles.get(task, task)}", fontsize=9)
      ax.grid(alpha=0.3)
  axes[0][-1].legend(fontsize=6, loc="upper left")
  fig.suptitle("KV-cache policies: scores through the decode cache against the budget")
  fig.tight_layout()
  fig.savefig(path, dpi=110, format="png")
  plt.close(fig)


def write_outputs(out: str, results: dict) -> str:
  os.makedirs(out, exist_ok=True)
  table = format_table(results)
  with open(os.path.join(out, "results.json"), "w") as f:
    json.dump(results, f, indent=2)
  with open(os.path.join(out, "table.md"), "w") as f:
    f.write(f"Command: `{results['settings']['command']}`\n\n{table}\n")
  plot(results, os.path.join(out, "kv_policies.png"))
  return table


def rewrite_report(out: str) -> int:
  """``--report``: table.md and the plot again from ``out/results.json``."""
  try:
    with open(os.path.join(out, "results.json")) as f:
      results = json.load(f)
  except (OSError, json.JSONDecodeError) as error:
    print(f"error: --report {out}: cannot read results.json: {error}", file=sys.stderr)
    return 2
  print(write_outputs(out, results))
  return 0


def main(argv=None) -> int:
  argv = sys.argv[1:] if argv is None else list(argv)
  args = _parser().parse_args(argv)
  if args.report is not None:
    return rewrite_report(args.report)
  try:
    _check_args(args)
    budgets = parse_budgets(args.budgets)
    lengths = parse_lengths(args.lengths, args.task_list, args.num_digits)
    from layers import kv_policies  # pylint: disable=import-outside-toplevel
    policies_hash = policies_file_hash(kv_policies.__file__)
    available = tuple(kv_policies.ALL_POLICIES)
    builders = spec_builders(available, args.spec)
    policies = parse_policies(args.policies, builders, available)
  except UsageError as error:
    print(f"error: {error}", file=sys.stderr)
    return 2

  # Imported late: parsing and error reporting stay fast.
  from experiments import train as train_main  # pylint: disable=import-outside-toplevel
  from lclm import provenance  # pylint: disable=import-outside-toplevel
  from lclm.training import checkpointing  # pylint: disable=import-outside-toplevel

  started = time.perf_counter()
  models, configs = {}, []
  for workdir, label in zip(args.workdirs, args.model_labels):
    try:
      mut = ModelUnderTest.load(workdir, step=args.step, gin_params=args.gin_param)
    except (FileNotFoundError, ValueError, TypeError,
            checkpointing.UnreadableCheckpointsError) as error:
      print(f"error: cannot load a model from {workdir}: {error}", file=sys.stderr)
      return 2
    except RuntimeError as error:
      return train_main.missing_binding_exit(error)
    own_config = os.path.join(workdir, "config.gin")
    if os.path.isfile(own_config):
      with open(own_config) as f:
        configs.append(f"# {label}: {own_config}\n{f.read()}")
    print(f"== {label}: {workdir} ({mut.loaded.kind}, step {mut.loaded.step})", flush=True)
    models[label] = evaluate_model(mut, label, lengths, budgets, policies, builders, args)

  results = {
      "settings": {
          "command": "python -m experiments.kv_policies " + " ".join(argv),
          "models": dict(zip(args.model_labels, map(os.path.abspath, args.workdirs))),
          "policies": policies, "specs": {p: builders[p] for p in policies},
          "available_policies": list(available),
          "budgets": [str(b) for b in budgets], "lengths": lengths, "tasks": args.task_list,
          "examples_per_length": args.examples, "text_rows_per_length": args.text_examples,
          "batch_size": args.batch_size, "prefill_chunk": args.prefill_chunk,
          "score_chunk": args.score_chunk, "num_digits": args.num_digits, "seed": args.seed,
          "step": args.step, "gin_params": list(args.gin_param),
          "kv_policies_sha256": policies_hash,
      },
      "models": models,
      "seconds": time.perf_counter() - started,
      "provenance": provenance.collect(seed=args.seed, gin_config="\n".join(configs)),
  }
  table = write_outputs(args.out, results)
  print(table)
  print(f"wrote {args.out}/results.json, table.md, kv_policies.png "
        f"({results['seconds']:.0f} s)")
  return 0


if __name__ == "__main__":
  sys.exit(main())
