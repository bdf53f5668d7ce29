"""What every long-running entry point does first: refuse stray arguments, set log levels."""

import logging as std_logging

from absl import app, logging


def start(argv) -> None:
  """Rejects positional arguments (a mistyped flag would otherwise be ignored) and logs our
  progress at INFO while the libraries' chatter (Orbax logs every file it renames) stays at
  WARNING."""
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.set_verbosity(logging.WARNING)
  std_logging.getLogger("emo_jax").setLevel(std_logging.INFO)
