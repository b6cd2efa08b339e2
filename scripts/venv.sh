#!/usr/bin/env bash
# The virtual environment of the test command (scripts/test sources this): .venv beside this
# checkout (ignored by git), made from the system Python and reused while its Python runs and
# pyproject.toml is unchanged; gpuwatch (editable) and the test tools installed into it. PEP 668
# systems such as Debian 12 and Ubuntu 24.04 refuse `pip install` into the system Python itself.
# Sets $python to the environment's interpreter. GPUWATCH_VENV names another directory; PYTHON
# the interpreter that makes it (default: python3, the first on PATH). Run by itself
# (`bash scripts/venv.sh`) it makes the environment and prints its interpreter.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

is_root_with_apt() { [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; }

apt_install() {  # apt_install WHY PACKAGE...
  local why=$1
  shift
  echo "installing $* ($why)"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}

venv=${GPUWATCH_VENV:-.venv}
case $venv in /*) ;; *) venv="$PWD/$venv" ;; esac
base_python=${PYTHON:-python3}

stamp_of() { { cat pyproject.toml; "$1" -c 'import sys; print(sys.version)'; pwd; } | cksum; }

if [ -x "$venv/bin/python" ] && "$venv/bin/python" -c 'import sys; sys.exit(sys.version_info < (3, 10))' 2>/dev/null; then
  :
else
  command -v "$base_python" >/dev/null 2>&1 || { echo "scripts/venv.sh: $base_python not found (Python 3.10+ needed)" >&2; exit 2; }
  if ! "$base_python" -c 'import ensurepip, venv' >/dev/null 2>&1; then
    # Debian and Ubuntu ship venv's ensurepip in a package of its own.
    if is_root_with_apt; then
      apt_install "python3 -m venv needs it" python3-venv
    else
      echo "scripts/venv.sh: '$base_python -m venv' cannot work here (no ensurepip): install python3-venv" \
        "(as root: apt-get install python3-venv; or: sudo apt install python3-venv) and run this again" >&2
      exit 2
    fi
  fi
  if [ -e "$venv" ] && [ -f "$venv/pyvenv.cfg" ]; then
    rm -rf "$venv"  # a broken environment of ours (its Python is gone): made anew
  fi
  echo "making the virtual environment $venv (from $(command -v "$base_python"))"
  "$base_python" -m venv "$venv"
fi

python="$venv/bin/python"
stamp="$venv/.gpuwatch-test-stamp"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$(stamp_of "$python")" ]; then
  echo "installing gpuwatch and the test tools into $venv"
  "$python" -m pip install --quiet --disable-pip-version-check -e '.[test]'
  stamp_of "$python" >"$stamp"
fi

if [ "${BASH_SOURCE[0]}" = "$0" ]; then
  echo "$python"
fi
