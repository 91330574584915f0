"""``tvixstore copy``: a Nix closure from /nix/store, against a real Nix.

A real ``nix-build`` (no sandbox, offline: the builders are /bin/sh and
/bin/bash) builds three store paths, app -> lib -> dep.txt (lib also refers
to itself), and a fourth derivation with ``__structuredAttrs`` and
``exportReferencesGraph.closure = [ app ]`` whose output is the
``.attrs.json`` Nix gave its build: the file ``tvixstore copy`` reads. What
lands in the store is compared with what Nix says about each path
(``nix-store -q --hash --references``) and read back byte for byte.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.process.test_admin_import import run
from tvixmount.admin.nixcopy import ClosureEntry, read_closure, references_first
from tvixmount.castore import nixbase32, storepath
from tvixmount.errors import InvalidData

# Every builder script ends with the builtin ":". Nix 2.8 (Debian 12) kills
# the builder once its log pipe reaches EOF; a shell that execs a last
# coreutils command (cp, chmod) hands that EOF to a program that closes
# stdout and stderr before it exits, and the build then fails now and then
# "due to signal 9", under load nearly always. The shell, waiting instead,
# holds the pipe until it has exited.
CLOSURE_NIX = r"""
let
  dep = builtins.toFile "tvixmount-copy-dep.txt" "the dependency\n";
  lib = derivation {
    name = "tvixmount-copy-lib"; system = builtins.currentSystem; builder = "/bin/sh";
    args = [ "-c" ''
      /bin/mkdir -p $out/share/doc $out/bin
      echo ${dep} > $out/share/ref
      echo $out > $out/share/self
      /bin/ln -s ${dep} $out/share/dep
      printf '#!/bin/sh\necho lib\n' > $out/bin/lib; /bin/chmod +x $out/bin/lib
      /bin/head -c 300000 /dev/zero | /usr/bin/tr '\0' x > $out/share/doc/big
      :
    '' ];
  };
  app = derivation {
    name = "tvixmount-copy-app"; system = builtins.currentSystem; builder = "/bin/sh";
    args = [ "-c" "printf '#!/bin/sh\\nexec ${lib}/bin/lib\\n' > $out; /bin/chmod +x $out; :" ];
  };
in derivation {
  name = "tvixmount-copy-closure"; system = builtins.currentSystem; builder = "/bin/bash";
  __structuredAttrs = true;
  exportReferencesGraph.closure = [ app ];
  args = [ "-c" "source .attrs.sh; /bin/cp \"$NIX_ATTRS_JSON_FILE\" \"\${outputs[out]}\"; :" ];
}
"""


@pytest.fixture(scope="module")
def attrs_json(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The .attrs.json of a real build with exportReferencesGraph.closure = [ app ]."""
    if shutil.which("nix-build") is None or not os.access("/nix/store", os.W_OK):
        pytest.skip("needs nix-build and a writable /nix/store (Debian package nix-bin, as root)")
    expr = tmp_path_factory.mktemp("nix") / "closure.nix"
    expr.write_text(CLOSURE_NIX)
    done = subprocess.run(["nix-build", str(expr), "--no-out-link", "--option", "sandbox", "false"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return Path(done.stdout.strip())


def closure_paths(attrs: Path) -> dict[str, str]:
    """name (app, lib, dep) -> absolute store path, from the JSON."""
    paths = [item["path"] for item in json.loads(attrs.read_bytes())["closure"]]
    return {name: next(p for p in paths if p.endswith(f"-tvixmount-copy-{name}"))
            for name in ("app", "lib", "dep.txt")}


def nix_query(flag: str, path: str) -> list[str]:
    done = subprocess.run(["nix-store", "-q", flag, path], capture_output=True, text=True, check=True)
    return done.stdout.split()


def info(capsysbinary, store: Path, path: str) -> dict:
    code, out, err = run(capsysbinary, "--store-dir", str(store), "info", path)
    assert code == 0, err
    return json.loads(out)


def test_copy_keeps_each_paths_store_path_references_and_nar(attrs_json, tmp_path, capsysbinary):
    store = tmp_path / "store"
    code, out, err = run(capsysbinary, "--store-dir", str(store), "copy", str(attrs_json))
    assert (code, err) == (0, ""), err
    assert out.decode().startswith("copied 3 paths (0 already present): ")
    paths = closure_paths(attrs_json)
    code, out, _ = run(capsysbinary, "--store-dir", str(store), "list")
    assert sorted(out.decode().split()) == sorted(paths.values())
    for path in paths.values():
        got = info(capsysbinary, store, path)
        assert got["path"] == path
        assert got["narHash"] == nix_query("--hash", path)[0]
        assert sorted(got["references"]) == sorted(nix_query("--references", path))
    assert paths["lib"] in info(capsysbinary, store, paths["lib"])["references"]  # itself
    assert info(capsysbinary, store, paths["dep.txt"])["ca"].startswith("text:sha256:")
    code, out, err = run(capsysbinary, "--store-dir", str(store), "verify", "--nar")
    assert code == 0 and out.decode().endswith(": OK\n"), (out, err)
    code, out, _ = run(capsysbinary, "--store-dir", str(store), "cat", f"{paths['lib']}/share/doc/big")
    assert out == Path(paths["lib"], "share/doc/big").read_bytes() and len(out) == 300000
    code, out, _ = run(capsysbinary, "--store-dir", str(store), "ls", "-l", f"{paths['lib']}/share")
    assert f"dep -> {paths['dep.txt']}".encode() in out

    # Again, from the variable, as inside a build: everything is there already.
    os.environ["NIX_ATTRS_JSON_FILE"] = str(attrs_json)
    try:
        code, out, err = run(capsysbinary, "--store-dir", str(store), "copy")
    finally:
        del os.environ["NIX_ATTRS_JSON_FILE"]
    assert (code, err) == (0, "") and out.decode().startswith("copied 0 paths (3 already present): ")


def test_sri_nar_hashes_as_newer_nix_writes_them(attrs_json, tmp_path, capsysbinary):
    document = json.loads(attrs_json.read_bytes())
    for item in document["closure"]:
        digest = nixbase32.decode(item["narHash"].removeprefix("sha256:"))
        item["narHash"] = "sha256-" + base64.b64encode(digest).decode()
    sri = tmp_path / "sri.json"
    sri.write_text(json.dumps(document))
    code, out, err = run(capsysbinary, "--store-dir", str(tmp_path / "store"), "-q", "copy", str(sri))
    assert (code, out, err) == (0, b"", "")
    assert len(run(capsysbinary, "--store-dir", str(tmp_path / "store"), "list")[1].split()) == 3


def test_a_nar_hash_mismatch_stores_nothing_for_that_path_nor_its_referrers(attrs_json, tmp_path,
                                                                            capsysbinary):
    paths = closure_paths(attrs_json)
    document = json.loads(attrs_json.read_bytes())
    for item in document["closure"]:
        if item["path"] == paths["lib"]:
            item["narHash"] = "sha256:" + nixbase32.encode(bytes(32))
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(document))
    store = tmp_path / "store"
    code, out, err = run(capsysbinary, "--store-dir", str(store), "copy", str(bad))
    assert code == 1
    lines = err.splitlines()
    assert lines[0].startswith(f"tvixstore: error: copy {paths['lib']}: its NAR on disk is sha256:")
    assert lines[0].endswith("(changed since Nix described it?); not stored")
    assert lines[1] == (f"tvixstore: error: copy {paths['app']}: not copied: its reference {paths['lib']} "
                        "was not copied")
    assert len(lines) == 2
    assert out.decode().startswith("copied 1 paths (0 already present, 2 failed): ")
    code, out, _ = run(capsysbinary, "--store-dir", str(store), "list")
    assert out.decode().split() == [paths["dep.txt"]]


@pytest.mark.parametrize(
    ("content", "status", "message"),
    [
        (None, 2, "copy: no closure file: give NIX_ATTRS_JSON_FILE (an argument or the NIX_ATTRS_JSON_FILE "
                  "variable)"),
        (b"{not json", 1, "{F}: not JSON: "),
        (b'{"name": "x"}', 1, "{F}: no 'closure' key"),
        (b'{"closure": [{"path": "/nix/store/x"}]}', 1, "{F}: closure[0]: store path basename 'x': "),
        (b'{"closure": [{"path": "/nix/store/00000000000000000000000000000000-a", "narSize": 1,'
         b' "references": [], "narHash": "md5:00"}]}', 1, "{F}: closure[0]: /nix/store/0000"),
        (b'{"closure": [{"path": "/nix/store/00000000000000000000000000000000-a", "narSize": 1}]}', 1,
         "{F}: closure[0]: 'references' is missing"),
    ],
)
def test_bad_closure_files_are_one_line(tmp_path, capsysbinary, monkeypatch, content, status, message):
    monkeypatch.delenv("NIX_ATTRS_JSON_FILE", raising=False)
    name = tmp_path / "c.json"
    argv = ["--store-dir", str(tmp_path / "store"), "copy"]
    if content is not None:
        name.write_bytes(content)
        argv.append(str(name))
    code, out, err = run(capsysbinary, *argv)
    assert (code, out) == (status, b"")
    assert err.count("\n") == 1 and err.startswith("tvixstore: error: ")
    assert message.format(F=name) in err, err
    assert not (tmp_path / "store").exists()  # nothing was opened


def test_a_missing_closure_file_is_a_data_error(tmp_path, capsysbinary):
    code, _, err = run(capsysbinary, "--store-dir", str(tmp_path / "s"), "copy", str(tmp_path / "none.json"))
    assert code == 1 and err == f"tvixstore: error: {tmp_path / 'none.json'}: No such file or directory\n"


def _entry(name: str, *refs: str) -> ClosureEntry:
    def path(n: str) -> storepath.StorePath:
        return storepath.StorePath(bytes([ord(n[0])]) * 20, n)

    return ClosureEntry(path(name), bytes(32), 0, tuple(path(r) for r in refs))


def test_references_come_first_whatever_order_nix_lists_them_in():
    entries = [_entry("app", "lib", "app"), _entry("lib", "dep", "lib", "out-of-closure"), _entry("dep"),
               _entry("other", "dep")]
    for order in (entries, entries[::-1], [entries[2], entries[0], entries[3], entries[1]]):
        names = [e.path.name for e in references_first(order)]
        assert sorted(names) == ["app", "dep", "lib", "other"]
        assert names.index("dep") < names.index("lib") < names.index("app")
        assert names.index("dep") < names.index("other")
    with pytest.raises(InvalidData, match="reference cycle"):
        references_first([_entry("a", "b"), _entry("b", "a")])


def test_the_json_nix_writes_is_read_whole(attrs_json):
    entries = read_closure(attrs_json.read_bytes(), str(attrs_json))
    paths = closure_paths(attrs_json)
    by_path = {e.path.absolute: e for e in entries}
    assert set(by_path) == set(paths.values())
    lib = by_path[paths["lib"]]
    assert "sha256:" + nixbase32.encode(lib.nar_sha256) == nix_query("--hash", paths["lib"])[0]
    assert {r.absolute for r in lib.references} == set(nix_query("--references", paths["lib"]))
    assert by_path[paths["dep.txt"]].ca is not None
