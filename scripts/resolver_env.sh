# Sourced by update_lock.sh and make_wheelhouse.sh. make_resolver DIR: a venv in DIR with a recent pip (one that
# resolves for another platform with `pip install --dry-run --report`) and nothing else installed, so that its
# own packages never count as already present. Prints the venv's python.
make_resolver() {
    "${PYTHON:-python3}" -m venv "$1" >&2
    "$1/bin/python" -m pip install --quiet --upgrade "pip>=25" >&2
    "$1/bin/python" -m pip uninstall --quiet --yes setuptools wheel >/dev/null 2>&1 || true
    echo "$1/bin/python"
}
