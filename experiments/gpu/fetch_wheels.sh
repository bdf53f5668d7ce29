#!/usr/bin/env bash
# Downloads (on a machine that can reach the package registries) the wheels a bare jax GPU
# image lacks, into the git-ignored .whl/ at the repository root. Copy `.whl` to the
# accelerator machine with the checkout; run_benchmarks.sh installs them there. Versions and
# the tokamax notes: docs/accelerators.md.
set -euo pipefail
cd "$(dirname "$0")/../.."
P="--only-binary=:all: --python-version 3.12 --implementation cp --abi cp312
   --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64"
python3 -m pip download -q --no-deps $P -d .whl grain==0.2.18 array-record==0.8.6 \
    ml-collections==1.1.0 portpicker pydantic-core
# tokamax and its pure-Python dependencies (tokamax needs jax >= 0.11.1: GPU image only).
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 -d .whl \
    tokamax==0.0.17 einshape qwix typeguard==2.13.3 immutabledict tensorboardx pydantic \
    annotated-types typing-inspection
ls .whl
