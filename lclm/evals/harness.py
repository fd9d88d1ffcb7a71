"""lm-evaluation-harness adapter: the ``lm_eval`` model ``"lclm"`` runs any harness task on an
lclm model (a training run, an ``experiments.convert_hf`` directory or a Hugging Face folder,
all read by :func:`lclm.evals.loading.load_model`). Needs the ``eval`` extra
(``pip install -e .[eval]``, lm-eval >= 0.4.5, < 0.5).

Command line (lm-eval's own CLI, with this module imported so that ``--model lclm`` exists)::

    python -m lclm.evals.harness --model lclm --model_args workdir=runs/quickstart \\
        --tasks hellaswag,lambada_openai --batch_size 16 [--include_path my_tasks/] [--limit 100]
    # The same run at 4x its training length with YaRN (gin bindings over its config.gin):
    python -m lclm.evals.harness --model lclm --tasks my_long_task --include_path my_tasks/ \\
        --model_args "workdir=runs/quickstart,max_length=16384,gin_params=include \\
        'configs/positions/yarn.gin'; ROPE_FACTOR = 4.0"

From Python::

    import lm_eval
    from lclm.evals.harness import LclmLM
    results = lm_eval.simple_evaluate(model=LclmLM("runs/converted-llama", batch_size=16),
                                      tasks=["arc_easy"])

``--model_args`` (comma-separated ``key=value``, or a JSON object, e.g. ``'{"workdir": "runs/x",
"gin_params": ["DecoderLM.position_options = {...}"]}'`` for bindings with commas;
``batch_size`` comes from ``--batch_size``, whose default in lm-eval's CLI is 1):

* ``workdir``: the model's directory (required).
* ``step``: the checkpoint step of a run (default the newest).
* ``tokenizer``: ``byte`` or a tokenizer folder / file, instead of the run's own.
* ``max_length``: the context limit in tokens (default the run's training ``seq_len``, else
  2048). Longer inputs are cut on the left; ``loglikelihood_rolling`` scores long texts in
  disjoint windows of this many predicted tokens.
* ``max_gen_toks``: default number of generated tokens (256) when a task names none.
* ``gin_params``: ``;``-separated gin bindings (or a JSON list of them) applied over the run's
  ``config.gin``, e.g. other position options.
* ``prefill_chunk_size``: prefill generation prompts in chunks of this many tokens.
* ``seed``: sampling seed of ``generate_until`` requests that sample.

Sequences the adapter builds (all int32 token ids):

* ``loglikelihood(context, continuation)``: trailing whitespace of the context moves onto the
  continuation; ``context_ids = [bos] + encode(context)`` (no bos when the tokenizer has none;
  an empty context becomes ``[bos]``, or ``[eos]`` without a bos) and ``continuation_ids`` are
  the tokens of ``encode(context + continuation)`` after the context's, as lm-eval's Hugging
  Face model does. The row fed to the model is ``(context_ids + continuation_ids)[-(max_length
  + 1):][:-1]``, right-padded with 0 to a power-of-two width (at least 16, at most
  ``max_length``); the result is the float32 sum of ``log_softmax(logits)`` at the continuation
  tokens and whether every continuation token is the argmax.
* ``loglikelihood_rolling(text)``: ``encode(text)`` (no bos) is predicted from ``[bos]`` (or
  ``[eos]``) in windows of at most ``max_length`` predicted tokens, each token predicted once:
  a window's inputs are the token before it and its own tokens but the last, except the last
  window, which takes the ``max_length`` tokens before its end (lm-eval's
  ``get_rolling_token_windows`` with ``make_disjoint_window``); the result is the sum over
  windows.
* ``generate_until(context, gen_kwargs)``: the prompt is ``[bos] + encode(context)``, cut on
  the left to ``max_length - max_gen_toks`` tokens, generated from by
  :func:`lclm.inference.generate` (greedy, or sampled when ``do_sample`` / a positive
  ``temperature`` is given) for ``max_gen_toks`` tokens or until an eos id; the decoded text
  is cut at the first ``until`` string (the decode loop itself stops only at eos or after
  ``max_gen_toks``).

Requests are sorted by length (longest first) and run in batches of exactly ``batch_size`` rows
(the last batch filled with dummy rows), so jit compiles a handful of shapes; results come back
in the requests' order.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import sys
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from lm_eval import utils as lm_eval_utils
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model
from tqdm import tqdm

from lclm.evals import loading
from lclm.inference import generate

logger = logging.getLogger(__name__)

DEFAULT_MAX_LENGTH = 2048
DEFAULT_MAX_GEN_TOKS = 256
AUTO_BATCH_SIZE = 8  # What "--batch_size auto" becomes (no automatic search here).
_MIN_BUCKET = 16  # Narrowest padded width: short rows share one compiled forward.
_GENERATION_KEYS = frozenset({"until", "max_gen_toks", "max_new_tokens", "do_sample",
                              "temperature", "top_k", "top_p"})


def _next_power_of_two(n: int, minimum: int = 1) -> int:
  return max(minimum, 1 << max(0, int(n) - 1).bit_length())


def _bucket(length: int, limit: int) -> int:
  """The padded width of a batch whose longest row has ``length`` tokens: the next power of
  two (>= 16), at most ``max(limit, length)``."""
  return min(_next_power_of_two(length, _MIN_BUCKET), max(limit, length))


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _score(graphdef, state, inputs, targets, mask):
  """Per-row continuation scores of one batch.

  Args:
    graphdef, state: the model (``nnx.split``).
    inputs: int32 [batch, width] model inputs (right-padded).
    targets: int32 [batch, width] the next token of each input position.
    mask: bool [batch, width], True at the continuation's target positions.

  Returns:
    float32 [batch]: sum of log p(target) over the masked positions (log-softmax in float32);
    bool [batch]: every masked target is the argmax of its logits.
  """
  model = nnx.merge(graphdef, state)
  positions = jnp.broadcast_to(jnp.arange(inputs.shape[1], dtype=jnp.int32)[None], inputs.shape)
  logits = model(inputs, position_ids=positions).astype(jnp.float32)
  logprobs = jax.nn.log_softmax(logits, axis=-1)
  picked = jnp.take_along_axis(logprobs, targets[..., None], axis=-1)[..., 0]
  total = jnp.sum(jnp.where(mask, picked, 0.0), axis=-1)
  greedy = jnp.all(jnp.where(mask, jnp.argmax(logits, axis=-1) == targets, True), axis=-1)
  return total, greedy


def _int_option(name: str, value: Any, *, minimum: int = 1, allow_none: bool = False
                ) -> int | None:
  """``value`` (an int, or a string of digits as ``--model_args`` gives) as an int >=
  ``minimum``; ValueError naming ``name`` otherwise."""
  if value is None and allow_none:
    return None
  if isinstance(value, str) and value.strip().isdigit():
    value = int(value)
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
    raise ValueError(f"LclmLM: {name} must be an int >= {minimum}"
                     f"{' or None' if allow_none else ''}, got {value!r}.")
  return int(value)


def _gin_bindings(gin_params: str | Sequence[str] | None) -> list[str]:
  """``';'``-separated (or newline-separated) bindings, or a list of them, as a list."""
  if gin_params is None:
    return []
  if isinstance(gin_params, str):
    parts = gin_params.replace("\n", ";").split(";")
  elif isinstance(gin_params, Sequence) and all(isinstance(p, str) for p in gin_params):
    parts = list(gin_params)
  else:
    raise ValueError(f"LclmLM: gin_params must be a string of ';'-separated gin bindings or a "
                     f"list of bindings, got {gin_params!r}.")
  return [p.strip() for p in parts if p.strip()]


def _batch_size(value: Any) -> int:
  if isinstance(value, str) and value.strip().startswith("auto"):
    logger.warning("LclmLM: batch_size=%r: no automatic batch size search; using %d.", value,
                   AUTO_BATCH_SIZE)
    return AUTO_BATCH_SIZE
  return _int_option("batch_size", value)


def _register(cls):
  """``register_model("lclm")``, except for the copy of this file that ``python -m`` runs as
  ``__main__``: there the imported ``lclm.evals.harness`` registers its class (a second class
  under the same name is an error in lm-eval's registry)."""
  if __name__ == "__main__":
    return cls
  return register_model("lclm")(cls)


@_register
class LclmLM(LM):
  """An lclm model as an lm-eval ``LM`` (see the module docstring for the sequences it scores).

  Args:
    workdir: a training run directory, an ``experiments.convert_hf`` directory or a Hugging
      Face folder (:func:`lclm.evals.loading.load_model`). Or None with ``loaded``.
    step: checkpoint step of a run (default the newest).
    tokenizer: ``"byte"`` or a tokenizer folder / file overriding the run's own.
    batch_size: rows per compiled batch (default 8; an int, a string of digits, or
      ``"auto"``, which is 8). Memory grows with batch_size x padded width x vocabulary (the
      float32 logits of a batch).
    max_length: context limit in tokens (default the run's ``task.seq_len``, else 2048).
    max_gen_toks: generated tokens when a request does not say (default 256).
    gin_params: gin bindings over the run's configuration, ``';'``-separated or a list.
    prefill_chunk_size: chunked prefill for generation (:func:`lclm.inference.generate`).
    seed: base sampling seed (each sampled batch uses the next one).
    loaded: an already loaded :class:`lclm.evals.loading.LoadedModel` instead of ``workdir``.
    max_batch_size, device: accepted for lm-eval's CLI and ignored (jax places the model on
      its default backend).

  Raises:
    ValueError: no workdir, a model without a text tokenizer, a bad option.
    FileNotFoundError: ``workdir`` does not exist or holds no checkpoint.
  """

  def __init__(self, workdir: str | None = None, step: int | str | None = None,
               tokenizer: str | None = None, batch_size: int | str = 8,
               max_length: int | str | None = None,
               max_gen_toks: int | str = DEFAULT_MAX_GEN_TOKS,
               gin_params: str | Sequence[str] | None = None,
               prefill_chunk_size: int | str | None = None, seed: int | str = 1234, *,
               loaded: loading.LoadedModel | None = None, max_batch_size: Any = None,
               device: Any = None, **unknown):
    super().__init__()
    del max_batch_size  # lm-eval's CLI always passes these two.
    if unknown:
      raise ValueError(f"LclmLM: unknown model_args {sorted(unknown)}; accepted: workdir, step, "
                       "tokenizer, max_length, max_gen_toks, gin_params, prefill_chunk_size, "
                       "seed (and --batch_size).")
    if device:
      logger.info("LclmLM: device=%r is ignored; jax uses its default backend (%s).", device,
                  jax.default_backend())
    if loaded is None:
      loaded = self._load(workdir, step, tokenizer, _gin_bindings(gin_params))
    elif workdir is not None:
      raise ValueError("LclmLM: give workdir or loaded, not both.")
    if loaded.tokenizer is None:
      raise ValueError(
          f"LclmLM: the harness needs a text tokenizer, and the model of {loaded.source!r} has "
          f"none (its task, {getattr(loaded.task, 'name', None)!r}, is made of token ids). Give "
          "one with model_args tokenizer=byte or tokenizer=/path/to/tokenizer_folder (a "
          "tokenizer.json or tokenizer.model).")
    if loaded.tokenizer.vocab_size > loaded.vocab_size:
      raise ValueError(
          f"LclmLM: the tokenizer {loaded.tokenizer!r} makes ids up to "
          f"{loaded.tokenizer.vocab_size - 1}, beyond the model's vocabulary of "
          f"{loaded.vocab_size}; give the model's own tokenizer (model_args tokenizer=...).")
    self.loaded = loaded
    self.model = loaded.model
    self.tokenizer = loaded.tokenizer
    self._graphdef, self._state = nnx.split(loaded.model)
    self._batch_size = _batch_size(batch_size)
    if max_length is None:
      seq_len = getattr(loaded.task, "seq_len", None)
      max_length = seq_len if isinstance(seq_len, int) and seq_len > 0 else DEFAULT_MAX_LENGTH
    self._max_length = _int_option("max_length", max_length, minimum=2)
    self._max_gen_toks = _int_option("max_gen_toks", max_gen_toks)
    self.prefill_chunk_size = _int_option("prefill_chunk_size", prefill_chunk_size,
                                          allow_none=True)
    self.seed = _int_option("seed", seed, minimum=0)
    self._sampled_batches = 0

  @staticmethod
  def _load(workdir, step, tokenizer, gin_params) -> loading.LoadedModel:
    if workdir is None or (isinstance(workdir, str) and not workdir.strip()):
      raise ValueError("LclmLM: workdir is required: --model_args workdir=DIR, where DIR is an "
                       "lclm training run, an experiments.convert_hf directory or a Hugging "
                       "Face model folder.")
    workdir = str(workdir)
    if "://" not in workdir and not os.path.isdir(workdir):
      raise FileNotFoundError(f"LclmLM: workdir {workdir!r} is not a directory; give an lclm "
                              "training run, an experiments.convert_hf directory or a Hugging "
                              "Face model folder.")
    step = _int_option("step", step, minimum=0, allow_none=True)
    return loading.load_model(workdir, step=step, tokenizer=tokenizer, gin_params=gin_params)

  # ---- Properties lm-eval and users read.

  @property
  def max_length(self) -> int:
    return self._max_length

  @property
  def max_gen_toks(self) -> int:
    return self._max_gen_toks

  @property
  def batch_size(self) -> int:
    return self._batch_size

  @property
  def eot_token_id(self) -> int | None:
    eos = self.tokenizer.eos_ids
    return eos[0] if eos else None

  @property
  def prefix_token_id(self) -> int:
    """The token an empty context (and a rolling text) is predicted from: bos, else eos."""
    if self.tokenizer.bos_id is not None:
      return int(self.tokenizer.bos_id)
    if self.eot_token_id is not None:
      return int(self.eot_token_id)
    raise ValueError(f"LclmLM: the tokenizer {self.tokenizer!r} has neither a bos nor an eos "
                     "token, needed to score an empty context or a whole text.")

  @property
  def tokenizer_name(self) -> str:
    return f"lclm:{self.loaded.source}:{self.tokenizer!r}"

  def get_model_info(self) -> dict[str, Any]:
    """What lm-eval records in ``results["config"]``."""
    return {"lclm_source": self.loaded.source, "lclm_kind": self.loaded.kind,
            "lclm_step": self.loaded.step, "max_length": self.max_length}

  # ---- Tokens.

  def tok_encode(self, text: str, add_bos: bool = True) -> list[int]:
    """Token ids of ``text``, with the tokenizer's bos first when it has one and ``add_bos``."""
    bos = add_bos and self.tokenizer.bos_id is not None
    return [int(t) for t in self.tokenizer.encode(text, add_bos=bos)]

  def encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """(context ids, continuation ids) of a loglikelihood request (see the module docstring)."""
    if context == "":
      return [self.prefix_token_id], self.tok_encode(continuation, add_bos=False)
    spaces = len(context) - len(context.rstrip())
    if spaces:
      context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole = self.tok_encode(context + continuation)
    context_ids = self.tok_encode(context)
    continuation_ids = whole[len(context_ids):]
    return context_ids or [self.prefix_token_id], continuation_ids

  # ---- lm-eval's three request types.

  def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
    """(log p(continuation | context), is_greedy) of each request's ``(context,
    continuation)``, in the requests' order."""
    pairs = [self.encode_pair(*req.args) for req in requests]
    results = self.loglikelihood_tokens(pairs, disable_tqdm=disable_tqdm)
    for req, result in zip(requests, results):
      self.cache_hook.add_partial("loglikelihood", req.args, result)
    return results

  def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
    """The log-probability of each request's whole ``(text,)``, scored in disjoint windows of
    at most ``max_length`` predicted tokens."""
    windows, owner = [], []
    for i, req in enumerate(requests):
      (text,) = req.args
      for window in lm_eval_utils.get_rolling_token_windows(
          token_list=self.tok_encode(text, add_bos=False), prefix_token=self.prefix_token_id,
          max_seq_len=self.max_length, context_len=1):
        windows.append(lm_eval_utils.make_disjoint_window(window))
        owner.append(i)
    scores = self.loglikelihood_tokens(windows, disable_tqdm=disable_tqdm,
                                       desc="Running loglikelihood_rolling requests")
    totals = [0.0] * len(requests)
    for i, (logprob, _) in zip(owner, scores):
      totals[i] += logprob
    for req, total in zip(requests, totals):
      self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
    return totals

  def loglikelihood_tokens(self, pairs: Sequence[tuple[Sequence[int], Sequence[int]]], *,
                           disable_tqdm: bool = False,
                           desc: str = "Running loglikelihood requests"
                           ) -> list[tuple[float, bool]]:
    """(sum of log p, is_greedy) of each ``(context_ids, continuation_ids)`` pair.

    The context is cut on the left so that context + continuation minus the last token fits
    ``max_length``; an empty continuation scores ``(0.0, True)``.

    Raises:
      ValueError: an empty context, or a continuation longer than ``max_length`` tokens.
    """
    rows = []
    for context, continuation in pairs:
      context, continuation = list(context), list(continuation)
      if not context:
        raise ValueError("LclmLM: a loglikelihood context needs at least one token (the "
                         "prefix token of an empty context).")
      if len(continuation) > self.max_length:
        raise ValueError(f"LclmLM: a continuation of {len(continuation)} tokens does not fit "
                         f"max_length={self.max_length}; raise max_length.")
      whole = (context + continuation)[-(self.max_length + 1):]
      rows.append((whole, len(continuation)))
    results: list[tuple[float, bool] | None] = [None] * len(rows)
    order = [i for i in sorted(range(len(rows)), key=lambda i: -len(rows[i][0])) if rows[i][1]]
    for i, (_, count) in enumerate(rows):
      if not count:
        results[i] = (0.0, True)
    size = self.batch_size
    with tqdm(total=len(rows), disable=disable_tqdm, desc=desc) as bar:
      bar.update(len(rows) - len(order))
      for start in range(0, len(order), size):
        batch = order[start:start + size]
        width = _bucket(len(rows[batch[0]][0]) - 1, self.max_length)
        inputs = np.zeros((size, width), np.int32)
        targets = np.zeros((size, width), np.int32)
        mask = np.zeros((size, width), bool)
        for r, i in enumerate(batch):
          whole, count = rows[i]
          n = len(whole) - 1
          inputs[r, :n], targets[r, :n] = whole[:-1], whole[1:]
          mask[r, n - count:n] = True
        total, greedy = jax.device_get(_score(self._graphdef, self._state, jnp.asarray(inputs),
                                              jnp.asarray(targets), jnp.asarray(mask)))
        for r, i in enumerate(batch):
          results[i] = (float(total[r]), bool(greedy[r]))
        bar.update(len(batch))
    return results  # type: ignore[return-value]

  def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
    """The generated text of each request's ``(context, gen_kwargs)``, cut at the first
    ``until`` string, in the requests' order."""
    groups: dict[str, list[int]] = {}
    for i, req in enumerate(requests):
      key = json.dumps(req.args[1], sort_keys=True, default=str)
      groups.setdefault(key, []).append(i)
    results: list[str | None] = [None] * len(requests)
    with tqdm(total=len(requests), disable=disable_tqdm,
              desc="Running generate_until requests") as bar:
      for indices in groups.values():
        options = self.generation_options(requests[indices[0]].args[1])
        texts = self.generate_texts([requests[i].args[0] for i in indices], **options,
                                    progress=bar)
        for i, text in zip(indices, texts):
          results[i] = text
          self.cache_hook.add_partial("generate_until", requests[i].args, text)
    return results  # type: ignore[return-value]

  # ---- Generation.

  def generation_options(self, gen_kwargs: dict[str, Any] | None) -> dict[str, Any]:
    """A task's ``gen_kwargs`` as :meth:`generate_texts` options: ``until`` (list of str),
    ``max_gen_toks``, ``temperature`` (0.0 = greedy), ``top_k``, ``top_p``."""
    if not isinstance(gen_kwargs, (dict, type(None))):
      raise ValueError(f"LclmLM: gen_kwargs must be a dict, got {gen_kwargs!r}.")
    kwargs = dict(gen_kwargs or {})
    ignored = sorted(set(kwargs) - _GENERATION_KEYS)
    if ignored:
      logger.warning("LclmLM: ignoring generation options %s (supported: %s).", ignored,
                     sorted(_GENERATION_KEYS))
    until = kwargs.get("until")
    until = [] if until is None else [until] if isinstance(until, str) else until
    if not isinstance(until, (list, tuple)) or not all(isinstance(u, str) for u in until):
      raise ValueError(f"LclmLM: gen_kwargs 'until' must be a string or a list of strings, got "
                       f"{kwargs.get('until')!r}.")
    max_gen = kwargs.get("max_gen_toks", kwargs.get("max_new_tokens"))
    max_gen = self.max_gen_toks if max_gen is None else _int_option("max_gen_toks", max_gen)
    temperature = kwargs.get("temperature")
    temperature = None if temperature is None else float(temperature)
    do_sample = kwargs.get("do_sample")
    if do_sample is None:  # Sampling when a positive temperature is given (lm-eval's rule).
      do_sample = bool(temperature)
    if not do_sample:
      temperature = 0.0
    elif temperature is None:
      temperature = 1.0  # do_sample=True at the natural temperature; 0.0 stays greedy.
    if temperature < 0:
      raise ValueError(f"LclmLM: gen_kwargs temperature must be >= 0, got {temperature}.")
    sampled = temperature > 0
    return {"until": list(until), "max_gen_toks": max_gen, "temperature": temperature,
            "top_k": kwargs.get("top_k") if sampled else None,
            "top_p": kwargs.get("top_p") if sampled else None}

  def generate_texts(self, contexts: Sequence[str], *, until: Sequence[str] = (),
                     max_gen_toks: int | None = None, temperature: float = 0.0,
                     top_k: int | None = None, top_p: float | None = None,
                     progress=None) -> list[str]:
    """Generated text after each context (see the module docstring), in their order.

    Raises:
      ValueError: ``max_gen_toks`` leaves no room for a prompt within ``max_length``.
    """
    max_gen = self.max_gen_toks if max_gen_toks is None else max_gen_toks
    room = self.max_length - max_gen
    if room < 1:
      raise ValueError(f"LclmLM: max_gen_toks={max_gen} leaves no room for a prompt within "
                       f"max_length={self.max_length}; raise max_length or lower max_gen_toks.")
    prompts = [(self.tok_encode(c) or [self.prefix_token_id])[-room:] for c in contexts]
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    eos = set(self.tokenizer.eos_ids)
    size = self.batch_size
    results: list[str | None] = [None] * len(prompts)
    for start in range(0, len(order), size):
      batch = order[start:start + size]
      width = _next_power_of_two(len(prompts[batch[0]]), _MIN_BUCKET)
      tokens = np.zeros((size, width), np.int32)
      lengths = np.zeros((size,), np.int32)
      for r in range(size):  # Dummy rows repeat the batch's first prompt.
        prompt = prompts[batch[r] if r < len(batch) else batch[0]]
        tokens[r, :len(prompt)] = prompt
        lengths[r] = len(prompt)
      seed = self.seed
      if temperature > 0:
        seed += self._sampled_batches
        self._sampled_batches += 1
      out = np.asarray(generate(
          self.model, tokens, max_new_tokens=max_gen, prompt_lengths=lengths,
          temperature=temperature, top_k=top_k, top_p=top_p, seed=seed,
          stop_tokens=tuple(sorted(eos)), prefill_chunk_size=self.prefill_chunk_size))
      for r, i in enumerate(batch):
        ids = out[r].tolist()
        stop = next((k for k, t in enumerate(ids) if t in eos), len(ids))
        results[i] = cut_at(self.tokenizer.decode(ids[:stop]), until)
      if progress is not None:
        progress.update(len(batch))
    return results  # type: ignore[return-value]


def cut_at(text: str, until: Sequence[str]) -> str:
  """``text`` up to the earliest occurrence of any non-empty string of ``until``."""
  cut = len(text)
  for stop in until:
    if stop:
      at = text.find(stop)
      if at >= 0:
        cut = min(cut, at)
  return text[:cut]


def main(argv: Sequence[str] | None = None) -> None:
  """lm-eval's command line (``lm-eval run ...`` arguments) with the ``lclm`` model registered;
  ``argv`` replaces ``sys.argv[1:]`` when given."""
  from lm_eval.__main__ import cli_evaluate  # pylint: disable=import-outside-toplevel

  if argv is not None:
    sys.argv = [sys.argv[0], *argv]
  cli_evaluate()


__all__ = ["AUTO_BATCH_SIZE", "DEFAULT_MAX_GEN_TOKS", "DEFAULT_MAX_LENGTH", "LclmLM", "cut_at",
           "main"]


if __name__ == "__main__":
  from lclm.evals import harness as _harness  # Registers "lclm" (see _register).

  _harness.main()
