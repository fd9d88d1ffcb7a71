"""Sequence mixers by name: the model is a list of names, a new core registers itself.

A mixer factory is called as ``factory(features, *, rngs, dtype, param_dtype, **options)``
and returns an ``nnx.Module`` whose ``__call__(x, *, position_ids, segment_ids)`` maps
x [batch, seq, features] to [batch, seq, features]; ``position_ids`` is int [batch, seq],
``segment_ids`` int [batch, seq] or None (tokens see only their own segment). A mixer may
ignore position_ids (a recurrence) but must honour segment_ids.

    @register_mixer("my_core")
    def my_core(features, *, rngs, dtype, param_dtype, width=4):
      return MyCore(features, width, rngs=rngs, dtype=dtype, param_dtype=param_dtype)

Importing the module that holds the decorator makes the name available to the model.

Decoding (generation): a mixer that can decode also provides

* ``init_cache(batch_size, max_length) -> cache``: its decode cache, a pytree of arrays (a
  KV cache, a ring buffer of a window, a recurrent state ...) for rows of up to
  ``max_length`` tokens;
* ``__call__(x, *, position_ids, segment_ids=None, cache, num_new_tokens=None) ->
  (y, new_cache)``: ``x`` [batch, T, features] continues the rows the cache holds (a prompt,
  a prefill chunk or one token); ``num_new_tokens`` (int [batch] or None for all T) says
  how many tokens of each row are real, the rest being right padding that must not change
  the cache.

The decoder stacks the mixers' caches (:meth:`lclm.model.DecoderLM.init_cache`) and never
special-cases a mixer.
"""

from __future__ import annotations

from typing import Callable

from flax import nnx

MixerFactory = Callable[..., nnx.Module]

# The mixer options that describe positions: ``DecoderLM.position_options`` (the files of
# configs/positions/) may set exactly these, for every mixer that accepts them.
POSITION_OPTIONS = ("rope_theta", "rope_scaling", "partial_rotary_factor", "rope_layout",
                    "max_position_embeddings", "position_extension")

_MIXERS: dict[str, MixerFactory] = {}


def _qualified_name(factory: MixerFactory) -> str:
  return f"{getattr(factory, '__module__', '?')}.{getattr(factory, '__qualname__', factory)}"


def register_mixer(name: str) -> Callable[[MixerFactory], MixerFactory]:
  """Decorator: registers ``factory`` under ``name`` and returns it unchanged.

  Registering a different factory under a taken name raises ValueError; re-registering
  the same function (a module reloaded in a notebook) replaces it.
  """
  if not isinstance(name, str) or not name:
    raise ValueError(f"register_mixer: name must be a non-empty string, got {name!r}.")

  def decorator(factory: MixerFactory) -> MixerFactory:
    if not callable(factory):
      raise ValueError(f"register_mixer({name!r}): {factory!r} is not callable.")
    existing = _MIXERS.get(name)
    if existing is not None and _qualified_name(existing) != _qualified_name(factory):
      raise ValueError(
          f"register_mixer: the name {name!r} is already taken by "
          f"{_qualified_name(existing)}; pick another name."
      )
    _MIXERS[name] = factory
    return factory

  return decorator


def unregister_mixer(name: str) -> None:
  """Removes ``name`` from the registry (tests and notebooks); unknown names are ignored."""
  _MIXERS.pop(name, None)


def registered_mixers() -> tuple[str, ...]:
  """The registered mixer names, sorted."""
  return tuple(sorted(_MIXERS))


def get_mixer(name: str) -> MixerFactory:
  """The factory registered under ``name``; ValueError listing the known names otherwise."""
  try:
    return _MIXERS[name]
  except (KeyError, TypeError):
    raise ValueError(
        f"Unknown mixer {name!r}; registered mixers: {', '.join(registered_mixers())}. "
        "A mixer is registered when the module defining it is imported."
    ) from None
