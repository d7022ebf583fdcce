#!/usr/bin/env bash
# The test suite, on a fresh machine too: env.sh picks the environment (the active python when
# it has the requirements, otherwise the virtualenv .venv, made on the first run), then
#
#   python -m pytest -q --durations=15 tests
#
# runs from the repository root, and, when no arguments are given, first `lint-imports` (the
# layers' contract in .importlinter), then after the suite the fixture tests
# (tests/test_parity*.py) a second time under other CPU kernels:
#
#   ATEN_CPU_CAPABILITY=avx2 DNNL_MAX_CPU_ISA=AVX2 OMP_NUM_THREADS=1 python -m pytest -q tests/test_parity*.py
#
# (less test_a_real_change_is_caught, which forces the tolerance branch wherever it runs)
# so that their tolerance branch (taken wherever the kernels differ from the fixture's) runs on
# every machine. This is the command CI runs (.ci/run).
#   ./run_tests.sh                          lint-imports, the whole suite, then the fixture tests under AVX2
#   ./run_tests.sh -x -k checkpoint         extra arguments go to pytest (no second pass)
#   ./run_tests.sh tests/test_geometry.py   given test paths replace the default "tests"
# Exit code: 1 when lint-imports fails, else pytest's (the first non-zero of the two passes),
# except 1 when it collected no tests (its 5).
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

pytest_pass() {
    set +e
    "$@"
    local rc=$?
    set -e
    if [[ "$rc" -eq 5 ]]; then
        echo "run_tests.sh: pytest collected no tests; failing." >&2
        return 1
    fi
    return "$rc"
}

rc=0
if [[ $# -eq 0 ]]; then
    echo "run_tests.sh: lint-imports (the layers' contract, .importlinter)"
    lint-imports || rc=1
fi
pytest_pass python -m pytest -q --durations=15 ${where[@]+"${where[@]}"} "$@" || { r=$?; [[ "$rc" -ne 0 ]] || rc=$r; }
if [[ $# -eq 0 ]]; then
    echo "run_tests.sh: the fixture tests again under other kernels (AVX2, 1 thread)"
    pytest_pass env ATEN_CPU_CAPABILITY=avx2 DNNL_MAX_CPU_ISA=AVX2 OMP_NUM_THREADS=1 \
        python -m pytest -q tests/test_parity*.py -k "not real_change" || { r=$?; [[ "$rc" -ne 0 ]] || rc=$r; }
fi
exit "$rc"
