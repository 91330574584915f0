#!/usr/bin/env bash
# Set up a fresh Debian 12 machine for tvixmount: system packages (as root),
# a virtualenv in .venv and the package with its test extras, editable.
# Idempotent and quiet when everything is already there.
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES=(fuse3 libfuse-dev pkg-config gcc python3-dev python3-venv attr
              squashfs-tools squashfuse nix-bin strace)

missing=()
for pkg in "${APT_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if ((${#missing[@]})); then
    if [[ $EUID -ne 0 ]]; then
        echo "setup: missing Debian packages: ${missing[*]} (run as root, or install them)" >&2
        exit 1
    fi
    echo "setup: installing ${missing[*]}" >&2
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi

# nix-bin makes its store on first use; the tests that build with real Nix want a
# writable /nix/store from the start, not only after another test has used Nix.
if [[ $EUID -eq 0 && ! -d /nix/store ]] && command -v nix-store >/dev/null; then
    echo "setup: initialising the Nix store in /nix/store" >&2
    nix-store --init
fi

PYTHON=${PYTHON:-python3}
if [[ ! -x .venv/bin/python ]]; then
    echo "setup: creating .venv with $($PYTHON --version)" >&2
    "$PYTHON" -m venv .venv
fi
stamp=.venv/.tvixmount-installed
if [[ ! -f $stamp || setup.cfg -nt $stamp || pyproject.toml -nt $stamp ]]; then
    echo "setup: installing tvixmount and its test tools into .venv" >&2
    .venv/bin/pip install -q --disable-pip-version-check -e '.[test]'
    touch "$stamp"
fi

# Man pages and shell completions from the parsers (tools/gen_shell_docs.py), into
# .venv/share: `man tvixmount` works with .venv/bin on PATH.
.venv/bin/python tools/gen_shell_docs.py -o .venv/share >/dev/null
