"""Getting emo_jax into a fresh notebook runtime (Colab) and saying what that runtime runs on.

The first cell of each notebook in colab/ clones the repository (or takes an uploaded wheel),
then calls `install` from here; when emo_jax is importable already the cell installs nothing.
Two things matter in Colab:

* **Keep the runtime's JAX.** Colab's GPU and TPU runtimes ship a JAX built for their
  accelerator; letting pip replace it with the CPU wheel from PyPI would silently move every
  computation to the CPU. When the installed JAX satisfies emo_jax's requirement it is pinned
  through a pip constraints file, so pip leaves it (and jaxlib) alone.
* **The extras a notebook needs.** to_pytorch.ipynb needs transformers >= 5 (Colab's may be
  older); quickstart.ipynb needs nothing beyond the base package.

This module imports only the standard library at the top, so the notebook can import it from
the cloned folder or the wheel (a zip on sys.path) before emo_jax is installed.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import tempfile
from typing import Sequence

# Must equal the jax entry of setup.py's install_requires (a test checks it).
JAX_REQUIREMENT = "jax>=0.10.2,<0.13"
# Packages whose runtime build is kept when the installed jax is kept.
JAX_PACKAGES = ("jax", "jaxlib")


def is_importable(module: str = "emo_jax") -> bool:
  return importlib.util.find_spec(module) is not None


def installed_version(distribution: str) -> str | None:
  try:
    return importlib.metadata.version(distribution)
  except importlib.metadata.PackageNotFoundError:
    return None


def _release(version: str) -> tuple[int, ...]:
  """The numeric release of a version string ('0.10.2.dev1+cuda' -> (0, 10, 2))."""
  numbers = re.match(r"\d+(\.\d+)*", version)
  return tuple(int(x) for x in numbers.group(0).split(".")) if numbers else ()


def satisfies(version: str, requirement: str = JAX_REQUIREMENT) -> bool:
  """Whether `version` meets the >=, <, <=, >, == clauses of a requirement like 'jax>=1,<2'."""
  have = _release(version)
  for op, bound in re.findall(r"(>=|<=|==|!=|>|<)\s*([\w.]+)", requirement):
    want = _release(bound)
    n = max(len(have), len(want))
    a, b = have + (0,) * (n - len(have)), want + (0,) * (n - len(want))
    ok = {">=": a >= b, "<=": a <= b, "==": a == b, "!=": a != b, ">": a > b, "<": a < b}[op]
    if not ok:
      return False
  return True


def kept_packages(versions: dict[str, str | None] | None = None,
                  requirement: str = JAX_REQUIREMENT) -> dict[str, str]:
  """{package: version} to pin so that pip keeps the runtime's JAX build; {} when the installed
  jax is missing or does not satisfy `requirement` (then pip installs a suitable one)."""
  if versions is None:
    versions = {p: installed_version(p) for p in JAX_PACKAGES}
  jax_version = versions.get("jax")
  if not jax_version or not satisfies(jax_version, requirement):
    return {}
  return {p: v for p, v in versions.items() if v}


def pip_target(source: str, extras: Sequence[str] = ()) -> str:
  """What pip installs: a folder ('.'), a wheel file or a git URL, with extras."""
  suffix = f"[{','.join(extras)}]" if extras else ""
  if source.startswith(("git+", "https://", "http://")):
    url = source if source.startswith("git+") else f"git+{source}"
    return f"emo_jax{suffix} @ {url}"
  return f"{source}{suffix}"


def pip_command(source: str, extras: Sequence[str] = (), *, keep: dict[str, str] | None = None,
                constraints_file: str | None = None, editable: bool | None = None,
                python: str = sys.executable) -> list[str]:
  """The pip command that installs emo_jax from `source` with `extras`.

  keep: {package: version} pinned through `constraints_file` (which the caller writes, e.g.
  with `write_constraints`). editable: None = editable for a folder, else as given.
  """
  is_folder = not source.endswith(".whl") and not source.startswith(("git+", "http"))
  editable = is_folder if editable is None else editable
  cmd = [python, "-m", "pip", "install", "-q"]
  if editable:
    cmd.append("-e")
  cmd.append(pip_target(source, extras))
  if keep:
    if not constraints_file:
      raise ValueError("keeping packages needs a constraints_file to pin them in")
    cmd += ["-c", constraints_file]
  return cmd


def write_constraints(keep: dict[str, str], path: str | None = None) -> str:
  """Writes 'package==version' lines for pip's -c; returns the file's path."""
  if path is None:
    fd, path = tempfile.mkstemp(prefix="emo_jax_keep_", suffix=".txt")
    os.close(fd)
  with open(path, "w", encoding="utf-8") as f:
    f.writelines(f"{p}=={v}\n" for p, v in sorted(keep.items()))
  return path


def install(source: str, extras: Sequence[str] = (), *, run=subprocess.run) -> list[str]:
  """Installs emo_jax from `source` with `extras`, keeping a suitable runtime JAX; returns the
  pip command it ran. Prints what it keeps and what it runs."""
  keep = kept_packages()
  constraints = write_constraints(keep) if keep else None
  cmd = pip_command(source, extras, keep=keep, constraints_file=constraints)
  if keep:
    print("keeping the runtime's " + ", ".join(f"{p} {v}" for p, v in sorted(keep.items())))
  else:
    print(f"no installed JAX satisfies {JAX_REQUIREMENT}: pip installs one (the CPU build "
          "from PyPI; on a GPU runtime install jax[cuda12] afterwards)")
  print("running:", " ".join(cmd))
  run(cmd, check=True)
  if source not in sys.path and os.path.isdir(source):
    # An editable install is on sys.path only after a restart; this session imports the folder.
    sys.path.insert(0, os.path.abspath(source))
  return cmd


def accelerator_hint() -> str | None:
  """What the machine has that JAX might not use: 'gpu' (nvidia-smi), 'tpu' (Colab's TPU
  variables or /dev/accel*), or None."""
  if shutil.which("nvidia-smi"):
    return "gpu"
  if os.environ.get("COLAB_TPU_ADDR") or os.environ.get("TPU_NAME") or os.path.exists(
      "/dev/accel0") or os.path.exists("/dev/vfio/0"):
    return "tpu"
  return None


def runtime_report(devices=None, backend: str | None = None, hint: str | None = "auto") -> str:
  """One line naming the accelerator JAX runs on, plus a warning when the machine has one
  that JAX does not see (a CPU-only jax on a GPU or TPU runtime)."""
  if devices is None or backend is None:
    import jax  # pylint: disable=import-outside-toplevel
    devices, backend = jax.devices(), jax.default_backend()
    version = jax.__version__
  else:
    version = installed_version("jax") or "?"
  kinds = sorted({getattr(d, "device_kind", str(d)) for d in devices})
  line = f"JAX {version} on {backend}: {len(devices)} x {', '.join(kinds)}"
  hint = accelerator_hint() if hint == "auto" else hint
  if backend == "cpu" and hint is not None:
    fix = "pip install -U 'jax[cuda12]'" if hint == "gpu" else "pip install -U 'jax[tpu]'"
    line += (f". WARNING: this machine has a {hint.upper()} but JAX runs on the CPU; {fix} "
             "and restart the runtime")
  elif backend == "cpu":
    line += " (no accelerator: in Colab, Runtime > Change runtime type picks a GPU or TPU)"
  return line
