"""Length extrapolation: train at length L, evaluate at L, 2L, 4L, 8L, 16L per position method.

    python -m experiments.length_extrapolation \
        --gin_file=configs/experiments/length_extrapolation.gin --workdir=runs/length_extrapolation

Each *training* method (a positions file plus bindings, e.g. plain RoPE, NoPE, RoPE with PoSE,
RoPE with E²-LLM augmentation) trains one model with ``experiments.train``'s loop at the
task's length L (``SEQ_LEN``). Each trained model is then evaluated, at every multiple of L,
with each of its *evaluation* methods: the positions it was trained with ("as_trained"), or
a training-free method applied at evaluation time only (PI, NTK, dynamic NTK, YaRN, Llama 3,
with the factor of the evaluation length; Self-Extend with the group size that keeps every
relative position in the trained range; LM-Infinite). The trained parameters are restored
into the evaluation model: RoPE has no parameters, so only the static position options
change.

The run directory gets one ``train-<method>/`` run per training method, ``results.json``
(accuracy and loss per training method, evaluation method and length), ``table.md`` and
``length_extrapolation.png`` (accuracy and loss against length). Defaults are CPU-sized (the
quickstart's tiny model on MQAR at L = 64, about 15 minutes on 2 cores); the same config
scales on TPU with larger ``configs/model`` and task files. A finished training run is reused
when the command is repeated with the same ``--workdir``.
"""

from __future__ import annotations

import dataclasses
import math
import sys
import time
from typing import Callable, Sequence

import gin
import jax
from etils import epath
from flax import nnx

from experiments import sweeps, train as train_main
from lclm import sharding
from lclm.model import DecoderLM
from lclm.training import evaluation, loop, restore

# Training methods: positions files and bindings ({task}, {train_length}, {max_length} are
# filled in: the task's configurable name, L and the longest evaluation length).
TRAIN_METHODS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "rope": (("configs/positions/rope.gin",), ()),
    "nope": (("configs/positions/nope.gin",), ()),
    # PoSE: positions up to the longest evaluation length, from rows of L tokens.
    "pose": (("configs/positions/rope.gin",), (
        "{task}.position_transform = @PoSE()", "PoSE.target_length = {max_length}")),
    # E²-LLM: positions i / g + delta inside [0, L) for g in 1, 2, 4, ... up to the longest
    # evaluation multiple; evaluated with Position Interpolation by T / L.
    "e2llm": (("configs/positions/rope.gin",), (
        "{task}.position_transform = @RandomPositionOffset()",
        "RandomPositionOffset.target_length = {train_length}",
        "RandomPositionOffset.scale_factors = {scales}")),
}
RoPE_FREE = ("nope",)  # Training methods without RoPE: only "as_trained" applies.


def _factor(train_length: int, length: int) -> float:
  return max(length / train_length, 1.0)


def _self_extend_group(train_length: int, length: int, window: int) -> int:
  """The smallest group size G for which Self-Extend's largest relative position, that of
  the last query and the first key, ``(T - 1) // G + W - W // G``, stays below L."""
  if not 0 < window < train_length:
    raise ValueError(f"Self-Extend's window ({window}) must be in (0, {train_length}).")
  group = 1
  while (length - 1) // group + window - window // group >= train_length:
    group += 1
  return group


# Evaluation methods: (train_length, length) -> (positions files, bindings) on top of the
# training configuration.
EVAL_METHODS: dict[str, Callable[[int, int], tuple[tuple[str, ...], tuple[str, ...]]]] = {
    "as_trained": lambda L, T: ((), ()),
    "pi": lambda L, T: (("configs/positions/pi.gin",), (f"ROPE_FACTOR = {_factor(L, T)}",)),
    "ntk": lambda L, T: (("configs/positions/ntk.gin",), (f"ROPE_FACTOR = {_factor(L, T)}",)),
    # Dynamic NTK adapts to the length by itself; factor 2 as in Hugging Face's examples.
    "dynamic_ntk": lambda L, T: (("configs/positions/dynamic_ntk.gin",), ("ROPE_FACTOR = 2.0",)),
    "yarn": lambda L, T: (("configs/positions/yarn.gin",), (f"ROPE_FACTOR = {_factor(L, T)}",)),
    "llama3": lambda L, T: (("configs/positions/llama3.gin",),
                            (f"ROPE_FACTOR = {_factor(L, T)}",)),
    "self_extend": lambda L, T: (("configs/positions/self_extend.gin",), (
        f"SELF_EXTEND_WINDOW = {max(L // 4, 1)}",
        f"SELF_EXTEND_GROUP = {_self_extend_group(L, T, max(L // 4, 1))}")),
    "lm_infinite": lambda L, T: (("configs/positions/lm_infinite.gin",), ()),
}


@gin.configurable
@dataclasses.dataclass(frozen=True)
class LengthExtrapolation:
  """What the experiment runs (bind in gin as ``LengthExtrapolation.<field>``).

  runs: training method -> its evaluation methods (keys of TRAIN_METHODS / EVAL_METHODS).
  multipliers: evaluation lengths as multiples of the training length.
  eval_examples: held-out examples per length; eval_batch_size: their batch size.
  """
  runs: dict = dataclasses.field(default_factory=lambda: {"rope": ["as_trained"]})
  multipliers: Sequence[int] = (1, 2, 4, 8, 16)
  eval_examples: int = 256
  eval_batch_size: int = 32

  def validate(self):
    """Raises loop.ConfigurationError naming the field and what it expects."""
    try:
      self._check()
    except ValueError as error:
      raise loop.ConfigurationError(str(error)) from None

  def _check(self):
    if not isinstance(self.runs, dict) or not self.runs:
      raise ValueError("LengthExtrapolation.runs must map training methods to lists of "
                       f"evaluation methods, got {self.runs!r}.")
    for train_name, eval_names in self.runs.items():
      if train_name not in TRAIN_METHODS:
        raise ValueError(f"LengthExtrapolation.runs: unknown training method {train_name!r}; "
                         f"known: {sorted(TRAIN_METHODS)}.")
      unknown = sorted(set(eval_names) - set(EVAL_METHODS))
      if unknown or not eval_names:
        raise ValueError(f"LengthExtrapolation.runs[{train_name!r}]: evaluation methods must be "
                         f"a non-empty list of {sorted(EVAL_METHODS)}; unknown {unknown}.")
      if train_name in RoPE_FREE and set(eval_names) != {"as_trained"}:
        raise ValueError(f"LengthExtrapolation.runs[{train_name!r}]: a model trained without "
                         "RoPE takes only 'as_trained' (the RoPE methods have nothing to scale).")
    if not self.multipliers or any(not isinstance(m, int) or m < 1 for m in self.multipliers):
      raise ValueError(f"LengthExtrapolation.multipliers must be positive ints, got "
                       f"{self.multipliers!r}.")
    for name in ("eval_examples", "eval_batch_size"):
      value = getattr(self, name)
      if not isinstance(value, int) or value < 1:
        raise ValueError(f"LengthExtrapolation.{name} must be a positive int, got {value!r}.")


def _task_reference():
  ref = gin.query_parameter("train.task")
  if not isinstance(ref, gin.config.ConfigurableReference):
    raise ValueError(f"length_extrapolation: train.task must be bound to a task class such as "
                     f"@MqarTask, got {ref!r}.")
  return ref


def _train_config(name: str, train_length: int, max_multiple: int, task_name: str):
  files, bindings = TRAIN_METHODS[name]
  scales = [2 ** i for i in range(int(math.log2(max_multiple)) + 1)]
  fill = dict(task=task_name, train_length=train_length, max_length=train_length * max_multiple,
              scales=tuple(float(s) for s in scales))
  return list(files), [b.format(**fill) for b in bindings]


def _evaluate(model, task, length: int, settings: LengthExtrapolation, batch_sharding):
  """(accuracy, loss) of ``model`` on held-out batches of ``length`` tokens."""
  @jax.jit
  def sums(params, batch):
    m = nnx.merge(graphdef, params)
    logits = m(batch["inputs"], position_ids=batch["position_ids"],
               segment_ids=batch["segment_ids"])
    return evaluation.masked_loss_sums(logits, batch["targets"], batch["loss_mask"])

  graphdef, params = nnx.split(model)
  ce = correct = counted = 0.0
  for batch in task.eval_batches(length, settings.eval_batch_size, settings.eval_examples):
    c, h, n = jax.device_get(sums(params, jax.device_put(batch, batch_sharding)))
    ce, correct, counted = ce + float(c), correct + float(h), counted + float(n)
  if not counted:
    return float("nan"), float("nan")
  return correct / counted, ce / counted


def run(workdir: str, gin_files: Sequence[str], gin_params: Sequence[str]) -> dict:
  """Trains and evaluates every configured method; writes and returns the results."""
  train_main.parse_gin(gin_files, gin_params)
  settings = LengthExtrapolation()
  settings.validate()
  train_length = int(gin.query_parameter("%SEQ_LEN"))
  task_name = _task_reference().selector
  max_multiple = max(settings.multipliers)
  epath.Path(workdir).mkdir(parents=True, exist_ok=True)
  results = {"train_length": train_length, "multipliers": list(settings.multipliers),
             "task": task_name, "results": {}}
  started = time.perf_counter()
  for train_name, eval_names in settings.runs.items():
    files, bindings = _train_config(train_name, train_length, max_multiple, task_name)
    run_dir = str(epath.Path(workdir) / f"train-{train_name}")
    train_main.parse_gin([*gin_files, *files], [*gin_params, *bindings])
    if not sweeps.prepare_run(run_dir, exclude=("LengthExtrapolation",)):
      print(f"== training {train_name} at length {train_length}", flush=True)
      summary = loop.train(workdir=run_dir)
      if summary["status"] != "completed":
        raise RuntimeError(f"training {train_name} did not complete: {summary['status']}")
    total_steps = int(gin.query_parameter("train.total_steps"))
    task = _task_reference().configurable.wrapper()
    _, trained = restore.restore_trained_model(
        run_dir, lambda: DecoderLM(vocab_size=task.vocab_size, rngs=nnx.Rngs(0)),
        total_steps=total_steps)
    params = nnx.state(trained, nnx.Param)
    for eval_name in eval_names:
      curve = {}
      for multiple in settings.multipliers:
        length = train_length * multiple
        eval_files, eval_bindings = EVAL_METHODS[eval_name](train_length, length)
        train_main.parse_gin([*gin_files, *files, *eval_files],
                             [*gin_params, *bindings, *eval_bindings])
        mesh = sharding.make_mesh()
        batch_sharding = sharding.batch_sharding(mesh, sharding.axis_rules())
        abstract = nnx.eval_shape(lambda: DecoderLM(vocab_size=task.vocab_size,
                                                    rngs=nnx.Rngs(0)))
        model = nnx.merge(nnx.graphdef(abstract), params)
        model.eval()
        accuracy, loss = _evaluate(model, task, length, settings, batch_sharding)
        curve[str(length)] = {"accuracy": accuracy, "loss": loss}
        print(f"   {train_name:>6} -> {eval_name:<12} length {length:>6}: accuracy "
              f"{accuracy:.4f}  loss {loss:.4f}", flush=True)
      results["results"].setdefault(train_name, {})[eval_name] = curve
  results["seconds"] = time.perf_counter() - started
  write_outputs(workdir, results)
  return results


def format_table(results: dict) -> str:
  """Markdown: one row per (training, evaluation) method, accuracy (loss) per length."""
  lengths = [results["train_length"] * m for m in results["multipliers"]]
  header = "| trained with | evaluated with | " + " | ".join(
      f"{n} ({n // results['train_length']}L)" for n in lengths) + " |"
  lines = [header, "|" + "---|" * (len(lengths) + 2)]
  for train_name, evals in results["results"].items():
    for eval_name, curve in evals.items():
      cells = [f"{curve[str(n)]['accuracy']:.3f} ({curve[str(n)]['loss']:.2f})" for n in lengths]
      lines.append(f"| {train_name} | {eval_name} | " + " | ".join(cells) + " |")
  return "\n".join(lines)


def plot(results: dict, path: str) -> None:
  """Accuracy and loss against evaluation length, one line per (training, evaluation)."""
  import matplotlib
  matplotlib.use("Agg")
  from matplotlib import pyplot as plt

  lengths = [results["train_length"] * m for m in results["multipliers"]]
  fig, axes = plt.subplots(1, 2, figsize=(13, 5))
  styles = ["-", "--", "-.", ":"]
  for t, (train_name, evals) in enumerate(results["results"].items()):
    for eval_name, curve in evals.items():
      label = train_name if eval_name == "as_trained" else f"{train_name} + {eval_name} (eval)"
      for ax, metric in zip(axes, ("accuracy", "loss")):
        ax.plot(lengths, [curve[str(n)][metric] for n in lengths], styles[t % len(styles)],
                marker="o", markersize=3, label=label)
  for ax, metric in zip(axes, ("accuracy", "loss")):
    ax.set_xscale("log", base=2)
    ax.set_xticks(lengths, [str(n) for n in lengths])
    ax.axvline(results["train_length"], color="grey", linewidth=0.8)
    ax.set_xlabel("evaluation length (tokens; grey: training length)")
    ax.set_ylabel(f"held-out {results['task']} {metric}")
    ax.grid(alpha=0.3)
  axes[0].set_ylim(-0.02, 1.02)
  axes[1].legend(fontsize=7, loc="upper left")
  fig.suptitle(f"Length extrapolation: trained at {results['train_length']} tokens")
  fig.tight_layout()
  fig.savefig(path, dpi=120, format="png")  # path: a file name or a binary file object.
  plt.close(fig)


def write_outputs(workdir: str, results: dict) -> None:
  sweeps.write_outputs(workdir, results, table=format_table(results), plot=plot,
                       png_name="length_extrapolation.png")


def main(argv=None) -> int:
  return sweeps.main("python -m experiments.length_extrapolation", __doc__.split("\n")[0], run,
                     argv)


if __name__ == "__main__":
  sys.exit(main())
