# A Python virtual environment for the project's checks (under .local/, or CHECKS_VENV).
#   venv_require PACKAGE==VERSION   installs the pinned package unless it is there already
# Source this file; it sets VENV.

VENV="${CHECKS_VENV:-$PWD/.local/venv}"

venv_require() {
  local spec="$1" name="${1%%==*}" version="${1##*==}"
  if [ ! -x "$VENV/bin/python" ]; then
    python3 -m venv "$VENV"
  fi
  if [ "$("$VENV/bin/python" -m pip show "$name" 2>/dev/null | sed -n 's/^Version: //p')" != "$version" ]; then
    echo "installing $spec into $VENV"
    "$VENV/bin/pip" install --quiet --disable-pip-version-check "$spec"
  fi
}
