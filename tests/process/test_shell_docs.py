"""Man pages and shell completions generated from the parsers (tools/gen_shell_docs.py).

Generated for real into a temporary directory: the man pages render with
man(1) and carry the flags ``--help`` has, and bash completes subcommands
and flags through the generated function the way bash-completion calls it.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def generated(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("shell-docs")
    result = subprocess.run([sys.executable, str(ROOT / "tools" / "gen_shell_docs.py"), "-o", str(out)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return out


def test_man_pages_hold_every_flag(generated):
    mount = (generated / "man" / "man1" / "tvixmount.1").read_text()
    store = (generated / "man" / "man1" / "tvixstore.1").read_text()
    for flag in ("log\\-level", "metrics\\-listen", "workers", "list\\-root"):
        assert flag in mount, flag
    for text in ("systemd\\-units", "daemon", "listen\\-address", "metrics\\-listen", "mount"):
        assert text in store, text
    if shutil.which("man"):
        rendered = subprocess.run(["man", "-l", str(generated / "man" / "man1" / "tvixmount.1")],
                                  capture_output=True, text=True, timeout=60, env={"MANWIDTH": "100",
                                                                                 "PATH": "/usr/bin:/bin"})
        assert rendered.returncode == 0 and "TVIXMOUNT(1)" in rendered.stdout


def _complete(script: Path, function: str, words: list[str]) -> list[str]:
    """What bash offers for the last of ``words`` (as bash-completion would call ``function``)."""
    line = " ".join(words)
    code = (f"source {script}\n"
            f"COMP_WORDS=({' '.join(repr(w) for w in words)}); COMP_CWORD={len(words) - 1}\n"
            f"COMP_LINE={line!r}; COMP_POINT={len(line)}\n"
            f"{function} {words[0]} {words[-1]!r} {words[-2]!r}\n"
            'printf "%s\\n" "${COMPREPLY[@]}"\n')
    result = subprocess.run(["bash", "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return result.stdout.split()


def test_bash_completes_subcommands_and_flags(generated):
    store = generated / "bash-completion" / "completions" / "tvixstore"
    assert "daemon" in _complete(store, "_shtab_tvixstore", ["tvixstore", "da"])
    assert "systemd-units" in _complete(store, "_shtab_tvixstore", ["tvixstore", "sys"])
    assert "--metrics-listen" in _complete(store, "_shtab_tvixstore", ["tvixstore", "daemon", "--met"])
    mount = generated / "bash-completion" / "completions" / "tvixmount"
    assert "--log-level" in _complete(mount, "_shtab_tvixmount", ["tvixmount", "--log"])
    assert (generated / "zsh" / "site-functions" / "_tvixmount").read_text().startswith("#compdef tvixmount")
