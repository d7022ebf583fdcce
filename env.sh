# shellcheck shell=bash
# Sourced, not executed: picks the Python environment for run_demo.sh, run_tests.sh and .ci/run.
#
#   source ./env.sh && glnet_env [--tests] || exit 1
#
# glnet_env uses the current `python` as it is (an active venv or conda environment, or the
# system's) when it imports everything requirements.txt lists (requirements-dev.txt too with
# --tests) at the versions asked for. Otherwise it creates a virtualenv with `python3 -m venv`
# and `pip install -r requirements-dev.txt`, or reuses the one made before, and activates it.
# The virtualenv is keyed on the hash of the two requirements files, kept in a stamp file
# inside it: a missing stamp (an install that did not finish) or another hash (the
# requirements changed) makes it anew.
#
# Environment:
#   GLNET_VENV        the virtualenv's folder (default .venv; a relative path is taken from the
#                     repository root)
#   GLNET_FORCE_VENV  1: always use that virtualenv, never the current python (.ci/run sets it)
# One line says which environment is used. An error prints one line (pip's own output above
# it) and glnet_env returns non-zero.

_glnet_root=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)

_glnet_say() { printf 'env.sh: %s\n' "$*" >&2; }

# First 16 hex digits of the sha256 of requirements.txt + requirements-dev.txt (the same key
# .ci/run uses for its virtualenv's folder).
glnet_requirements_hash() {
    local sum
    if command -v sha256sum > /dev/null 2>&1; then
        sum=(sha256sum)
    elif command -v shasum > /dev/null 2>&1; then
        sum=(shasum -a 256)
    else
        _glnet_say "neither sha256sum nor shasum found; cannot hash the requirements"
        return 1
    fi
    (cd "$_glnet_root" && cat requirements.txt requirements-dev.txt) | "${sum[@]}" | cut -c1-16
}

# Exit 0 when `python` imports the packages of the given requirements files at their floors.
_glnet_python_fits() {
    command -v python > /dev/null 2>&1 || return 1
    python - "$@" > /dev/null 2>&1 << 'EOF'
import importlib, re, sys
from importlib import metadata

modules = {"pillow": "PIL", "pypng": "png", "import-linter": "importlinter"}  # distribution -> module, where the names differ


def release(version):
    return tuple(int(part) for part in re.match(r"\d+(?:\.\d+)*", version).group().split("."))


for path in sys.argv[1:]:
    with open(path) as f:
        for line in f:
            line = line.split("#")[0].strip()
            if not line or line.startswith("-"):
                continue
            match = re.fullmatch(r"([A-Za-z0-9_.-]+)\s*(?:>=\s*([0-9.]+))?", line)
            if match is None:  # a form this check does not read: let pip handle it
                sys.exit(1)
            name, floor = match.groups()
            importlib.import_module(modules.get(name.lower(), name))
            if floor and release(metadata.version(name)) < release(floor):
                sys.exit(1)
EOF
}

glnet_env() {
    local files=("$_glnet_root/requirements.txt")
    [[ "${1:-}" == --tests ]] && files+=("$_glnet_root/requirements-dev.txt")

    if [[ "${GLNET_FORCE_VENV:-0}" == 0 ]] && _glnet_python_fits "${files[@]}"; then
        _glnet_say "using the current python as it is: $(command -v python)"
        return 0
    fi

    local venv="${GLNET_VENV:-.venv}" hash stamp
    [[ "$venv" == /* ]] || venv="$_glnet_root/$venv"
    hash=$(glnet_requirements_hash) || return 1
    stamp="$venv/.glnet-requirements-hash"

    if [[ -f "$stamp" && "$(cat "$stamp")" == "$hash" && -f "$venv/bin/activate" ]]; then
        # shellcheck disable=SC1091
        source "$venv/bin/activate"
        _glnet_say "using virtualenv $venv (reused, requirements hash $hash)"
        return 0
    fi

    if ! command -v python3 > /dev/null 2>&1; then
        _glnet_say "python3 not found: install Python 3 (3.9 or newer), or activate an environment with the requirements"
        return 1
    fi
    if [[ -e "$venv" ]]; then
        # Only a virtualenv (or an empty folder) is deleted, never a folder GLNET_VENV names by mistake.
        if [[ ! -f "$venv/pyvenv.cfg" && -n "$(ls -A "$venv" 2> /dev/null)" ]]; then
            _glnet_say "$venv exists and is not a virtualenv; not touching it (set GLNET_VENV to another folder)"
            return 1
        fi
        rm -rf "$venv"
    fi
    _glnet_say "creating virtualenv $venv (requirements hash $hash): pip install -r requirements-dev.txt, several GB on the first run"
    if ! python3 -m venv "$venv"; then
        _glnet_say "python3 -m venv $venv failed (on Debian or Ubuntu: apt-get install python3-venv)"
        return 1
    fi
    printf '*\n' > "$venv/.gitignore"  # keeps git from seeing a .venv inside the clone
    if ! "$venv/bin/python" -m pip install --quiet -r "$_glnet_root/requirements-dev.txt"; then
        _glnet_say "pip install -r requirements-dev.txt into $venv failed (pip's message above)"
        return 1
    fi
    printf '%s\n' "$hash" > "$stamp"
    # shellcheck disable=SC1091
    source "$venv/bin/activate"
    _glnet_say "using virtualenv $venv (created, requirements hash $hash)"
}

# The stage scripts' helpers (they source this file).
# glnet_flags_from_env VAR=--flag ...: for each VAR set (non-empty), append --flag "$VAR" to the
# caller's array `args`; flags whose variable is unset are left out (their defaults apply).
glnet_flags_from_env() {
    local pair var
    for pair in "$@"; do
        var=${pair%%=*}
        if [[ -n "${!var:-}" ]]; then args+=("${pair#*=}" "${!var}"); fi
    done
}

# glnet_run SCRIPT ARG...: replace this shell with $PYTHON (default python) running SCRIPT; with
# NPROC=N, N processes on this machine under torchrun (one per GPU; gloo processes on a CPU).
glnet_run() {
    local script=$1 python
    shift
    read -r -a python <<< "${PYTHON:-python}"
    if [[ -n "${NPROC:-}" ]]; then
        exec "${python[@]}" -m torch.distributed.run --standalone --nproc_per_node "$NPROC" "$script" "$@"
    fi
    exec "${python[@]}" "$script" "$@"
}
