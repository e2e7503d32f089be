#!/usr/bin/env bash
# The test suite (the README's test command runs this after setup). Corpus-driven tests
# read ../shared/corpus in place and print their agreement figures.
set -euo pipefail
cd "$(dirname "$0")/.."
exec .venv/bin/python -m pytest -q -s -p no:cacheprovider "$@"
