#!/usr/bin/env bash
# The test suite, on a fresh machine too: env.sh picks the environment (the active python when
# it has the requirements, otherwise the virtualenv .venv, made on the first run), then
#
#   python -m pytest -q --durations=15 tests
#
# runs from the repository root. This is the command CI runs (.ci/run).
#   ./run_tests.sh                          the whole suite
#   ./run_tests.sh -x -k checkpoint         extra arguments go to pytest
#   ./run_tests.sh tests/test_geometry.py   given test paths replace the default "tests"
# Exit code: pytest's, except 1 when it collected no tests (its 5).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"
# shellcheck source=env.sh
source ./env.sh
glnet_env --tests || exit 1

# A test path among the arguments (a .py file, maybe with ::name, or a folder under tests)
# replaces the default "tests": pytest would otherwise collect the whole suite as well.
where=(tests)
for arg in "$@"; do
    path="${arg%%::*}"
    if [[ ( -f "$path" && "$path" == *.py ) || ( -d "$path" && "$path" == *tests* ) ]]; then
        where=()
        break
    fi
done

set +e
python -m pytest -q --durations=15 ${where[@]+"${where[@]}"} "$@"
rc=$?
set -e
if [[ "$rc" -eq 5 ]]; then
    echo "run_tests.sh: pytest collected no tests; failing." >&2
    exit 1
fi
exit "$rc"
