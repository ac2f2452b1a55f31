#!/usr/bin/env bash
# Set up diffprior in .venv from a fresh clone: find Python >= 3.12, make the virtual
# environment, install the package with the extras named on the command line.
#
#   bash setup.sh                 # the package alone: enough for `.venv/bin/diffprior demo`
#   bash setup.sh test            # + pytest, hypothesis, ruff (the test command of README.md)
#   bash setup.sh test docs       # + Sphinx and myst-nb (what CI installs)
#   bash setup.sh notebooks       # + jupytext, JupyterLab and a kernel, to open examples/*.md
#
# PYTHON=/path/to/python overrides the search. The search tries, in order: python3.12,
# python3.13, python3 on PATH, then the newest 3.12.x, else 3.13.x, under pyenv. Each candidate is
# run once to make sure it works: a pyenv shim can be on PATH and still refuse to run.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")"

extras=("$@")
for extra in "${extras[@]}"; do
    case "$extra" in
        test | docs | notebooks | dev | cuda) ;;
        *)
            echo "setup.sh: unknown extra '$extra' (expected: test, docs, notebooks, dev, cuda)" >&2
            exit 2
            ;;
    esac
done

works() {
    [[ -n "$1" ]] && "$1" -c 'import sys, venv; sys.exit(sys.version_info < (3, 12))' \
        >/dev/null 2>&1
}

find_python() {
    local candidate root
    if [[ -n "${PYTHON:-}" ]]; then
        works "$PYTHON" && { echo "$PYTHON"; return 0; }
        echo "setup.sh: PYTHON=$PYTHON is not a working Python >= 3.12" >&2
        return 1
    fi
    for candidate in python3.12 python3.13 python3; do
        candidate="$(command -v "$candidate" 2>/dev/null)" || continue
        works "$candidate" && { echo "$candidate"; return 0; }
    done
    local roots=()
    command -v pyenv >/dev/null 2>&1 && roots+=("$(pyenv root)")
    roots+=("${PYENV_ROOT:-$HOME/.pyenv}")
    # 3.12 first: the version CI tests; the newest patch release of it.
    for minor in 12 13; do
        for root in "${roots[@]}"; do
            while IFS= read -r candidate; do
                works "$candidate" && { echo "$candidate"; return 0; }
            done < <(compgen -G "$root/versions/3.$minor.*/bin/python3" | sort -rV)
        done
    done
    return 1
}

if works .venv/bin/python && .venv/bin/python -m pip --version >/dev/null 2>&1; then
    echo "setup.sh: reusing .venv ($(.venv/bin/python --version 2>&1))"
else
    if ! python="$(find_python)"; then
        echo "setup.sh: no Python >= 3.12 found (tried python3.12, python3.13 and python3 on" \
            "PATH, and pyenv's versions); install one or set PYTHON=/path/to/python3.12" >&2
        exit 1
    fi
    echo "setup.sh: making .venv with $python ($("$python" --version 2>&1))"
    rm -rf .venv
    "$python" -m venv .venv
fi

target="."
if [[ ${#extras[@]} -gt 0 ]]; then
    target=".[$(IFS=,; echo "${extras[*]}")]"
fi
echo "setup.sh: pip install -e \"$target\""
.venv/bin/python -m pip install --quiet --progress-bar off --disable-pip-version-check -e "$target"
