#!/usr/bin/env bash
# Resolves the Python dependencies again, to the newest versions pyproject.toml allows, and writes them
# exact, with everything they pull in:
#   requirements.txt       the program's own ([project] dependencies): what the image installs
#                          (scripts/image-wheels.sh)
#   requirements-test.txt  the test tools ([project.optional-dependencies] test) and pip, setuptools and wheel,
#                          which install the rest: what .ci/run installs (scripts/install-deps.sh)
# `make lock`; then `make test`, and commit both files with what had to change. Nothing else resolves a
# version: a machine set up tomorrow gets the same tools as today's, so CI cannot break without a change here.
set -euo pipefail
cd "$(dirname "$0")/.."
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
header() {
  printf '# %s\n' "$1" "Written by scripts/lock-deps.sh (make lock) from pyproject.toml; do not edit by hand."
}
freeze() { "$1/bin/pip" freeze --all --exclude containerboot --exclude pip --exclude setuptools --exclude wheel; }

/usr/bin/python3 -m venv "$tmp/run"
"$tmp/run/bin/pip" install -q --upgrade pip
"$tmp/run/bin/pip" install -q .
{ header "The program's dependencies, exact (the image installs these)."; freeze "$tmp/run"; } > requirements.txt

/usr/bin/python3 -m venv "$tmp/test"
"$tmp/test/bin/pip" install -q --upgrade pip setuptools wheel
"$tmp/test/bin/pip" install -q '.[test]'
{
  header "The test tools and the installers, exact (.ci/run installs these, with requirements.txt)."
  echo "-r requirements.txt"
  "$tmp/test/bin/pip" freeze --all | grep -E '^(pip|setuptools|wheel)=='
  freeze "$tmp/test" | grep -vxF -f <(freeze "$tmp/run")
} > requirements-test.txt
echo "lock-deps: requirements.txt ($(grep -c '==' requirements.txt) pins), requirements-test.txt" \
  "($(grep -c '==' requirements-test.txt) pins)"
