"""What every entry point does first: parse flags with one-line errors, refuse stray arguments,
set log levels, report an invalid host allocator setting (emo_jax/host_memory.py), and parse
the --config once into the typed Experiment every component then receives."""

import difflib
import importlib.util
import logging as std_logging
import sys

from absl import app, flags, logging

from emo_jax import host_memory
from emo_jax.config import ConfigError
from emo_jax.train.experiment import Experiment


def start(argv) -> None:
  """Rejects positional arguments (a mistyped flag would otherwise be ignored) and logs our
  progress at INFO while the libraries' chatter (Orbax logs every file it renames) stays at
  WARNING. The host allocator (emo_jax/host_memory.py) was set when the `experiments`
  package was imported; an invalid EMO_JAX_HOST_ALLOCATOR is reported here."""
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  try:
    host_memory.requested()
  except ValueError as e:
    raise app.UsageError(str(e)) from None
  logging.set_verbosity(logging.WARNING)
  std_logging.getLogger("emo_jax").setLevel(std_logging.INFO)


def experiment(config) -> Experiment:
  """The Experiment of a config file's ConfigDict (its command-line overrides applied): the one
  place an entry point parses its config. A bad config ends the process with one line."""
  return checked(lambda: Experiment.from_config(config))


def checked(build):
  """`build()`, with a ConfigError it raises turned into `error: ...` and exit status 1."""
  try:
    return build()
  except ConfigError as e:
    sys.exit(f"error: {e}")


def run(main) -> None:
  """`absl.app.run(main)` whose flag errors are one line, e.g. for an unknown config key."""
  app.run(main, flags_parser=parse_flags)


def parse_flags(argv):
  try:
    return flags.FLAGS(argv)
  except (flags.Error, AttributeError, KeyError) as e:
    print(f"error: {unknown_config_key(argv) or e}", file=sys.stderr)
    sys.exit(2)


def unknown_config_key(argv) -> str | None:
  """"unknown config key config.model.topk; did you mean config.model.top_k?" for the first
  `--config.a.b=...` override whose path the loaded config lacks, or None."""
  for arg in argv[1:]:
    name, _, _ = arg.lstrip("-").partition("=")
    root, _, path = name.partition(".")
    if not path or root not in flags.FLAGS:
      continue
    config = node = flags.FLAGS[root].value or _load_config_file(root, argv)
    if node is None or not hasattr(node, "keys"):
      continue
    walked = [root]
    for key in path.split("."):
      if not hasattr(node, "keys") or key not in node:
        known = list(node.keys()) if hasattr(node, "keys") else []
        close = difflib.get_close_matches(key, known, n=1)
        # The same key in another section (e.g. a run setting given under model.) is closer.
        moved = [s for s in config.keys() if hasattr(config[s], "keys") and key in config[s]]
        suggestion = [root, moved[0], key] if len(walked) == 2 and moved else walked + close
        hint = f"; did you mean {'.'.join(suggestion)}?" if moved or close else (
            f"; known keys there: {sorted(known)}")
        return f"unknown config key {'.'.join(walked + [key])}{hint}"
      node = node[key]
      walked.append(key)
  return None


def _load_config_file(root: str, argv):
  """The config that `--root PATH` names (a failed parse can leave the flag without it)."""
  for i, arg in enumerate(argv):
    path = arg.partition("=")[2] if arg.startswith(f"--{root}=") else (
        argv[i + 1] if arg == f"--{root}" and i + 1 < len(argv) else None)
    if path:
      try:
        spec = importlib.util.spec_from_file_location(f"_cli_{root}", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module.get_config()
      except Exception:  # pylint: disable=broad-except  (the flag error is reported instead)
        return None
  return None
