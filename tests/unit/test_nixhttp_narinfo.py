"""narinfo parsing, fingerprints and ed25519 signatures, against text and keys real Nix wrote.

The constants below were written by Nix 2.8 (``nix key generate-secret``,
``nix copy --to 'file://...?compression=zstd&secret-key=...'`` of a path
registered with two references and a deriver), so these tests cross-check
the fingerprint and signature code without Nix installed; the session
tests in test_nixhttp_substitute.py repeat the check on fresh output.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib

import pytest

from tvixmount.castore import nixbase32
from tvixmount.castore.nodes import DirectoryNode, FileNode
from tvixmount.castore.pathinfo import CA_KINDS, Signature, narinfo_fingerprint, validate_pathinfo
from tvixmount.castore.storepath import StorePath, parse_absolute
from tvixmount.errors import InvalidArgument, InvalidData
from tvixmount.store.nixhttp import narinfo, signing

NIX_SECRET_KEY = ("test-1:2+jCQaaKxeVz93Yz38jHLjEZZAInQFbID7CwrKmiYeBcWKSeE0bD0aDixHi8awGkEtcCJc4uR1cfNkRn"
                  "d5V9jg==")
NIX_PUBLIC_KEY = "test-1:XFiknhNGw9Gg4sR4vGsBpBLXAiXOLkdXHzZEZ3eVfY4="  # nix key convert-secret-to-public
NIX_NARINFO = b"""\
StorePath: /nix/store/0123456789abcdfghijklmnpqrsvwxyz-withrefs
URL: nar/0gpamasc6092rgihrmxw87fqpnbfa3gvkvxni2qrwy9zxp30ajyf.nar.zst
Compression: zstd
FileHash: sha256:0gpamasc6092rgihrmxw87fqpnbfa3gvkvxni2qrwy9zxp30ajyf
FileSize: 261
NarHash: sha256:1c3hndm4qfr458n9cyda2flk3qr4vjmkqcddcdp44zip75zs7x1s
NarSize: 808
References: 0123456789abcdfghijklmnpqrsvwxyz-withrefs 4kjlw03g6drdjmkqnvaqnbp6nrm3v9pk-src
Deriver: zzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzz-withrefs.drv
Sig: test-1:un6QF9tQ7o0goAxGmYxBa2mrLyoKfeTzP0rhgyqrOPZJws/eDdwGx1TEWfH/cPCSlnsKm45njAnaqnztWXgKAg==
"""
NIX_FINGERPRINT = (
    b"1;/nix/store/0123456789abcdfghijklmnpqrsvwxyz-withrefs;"
    b"sha256:1c3hndm4qfr458n9cyda2flk3qr4vjmkqcddcdp44zip75zs7x1s;808;"
    b"/nix/store/0123456789abcdfghijklmnpqrsvwxyz-withrefs,/nix/store/4kjlw03g6drdjmkqnvaqnbp6nrm3v9pk-src"
)
NIX_CA_NARINFO = b"""\
StorePath: /nix/store/4kjlw03g6drdjmkqnvaqnbp6nrm3v9pk-src
URL: nar/0lw8hhqan7rnxrgp7aqn6ii8by9k7sdyfdnrw9yj7nxpjdhnwl2g.nar
Compression: gzip
FileHash: sha256:0lw8hhqan7rnxrgp7aqn6ii8by9k7sdyfdnrw9yj7nxpjdhnwl2g
FileSize: 237
NarHash: sha256:16fz4aldbsvfavi7ivf290aypw8f8fmdgwlchxfrpkf9n94810zv
NarSize: 1424
References:\x20
Sig: test-1:LuCPT/Dxww3E0s2dJufoO6iT1CWTjuky/LVB2YRwEWf0i1BHhHMnMNp5vcOEIcKUQAHyJdtTsnqrzznoIoKsBw==
CA: fixed:r:sha256:16fz4aldbsvfavi7ivf290aypw8f8fmdgwlchxfrpkf9n94810zv
"""
NAR_SHA = nixbase32.decode("1c3hndm4qfr458n9cyda2flk3qr4vjmkqcddcdp44zip75zs7x1s")


def parsed() -> narinfo.NarinfoFile:
    return narinfo.parse(NIX_NARINFO, "test.narinfo")


def replace_line(text: bytes, key: bytes, line: bytes | None) -> bytes:
    out = []
    for old in text.splitlines(keepends=True):
        if old.startswith(key + b":"):
            if line is not None:
                out.append(line + b"\n")
        else:
            out.append(old)
    return b"".join(out)


# -- parsing -------------------------------------------------------------------------


def test_parses_what_nix_writes() -> None:
    info = parsed()
    assert info.store_path == parse_absolute("/nix/store/0123456789abcdfghijklmnpqrsvwxyz-withrefs")
    assert info.url == "nar/0gpamasc6092rgihrmxw87fqpnbfa3gvkvxni2qrwy9zxp30ajyf.nar.zst"
    assert info.compression == "zstd"
    assert info.file_sha256 == nixbase32.decode("0gpamasc6092rgihrmxw87fqpnbfa3gvkvxni2qrwy9zxp30ajyf")
    assert (info.file_size, info.nar_size, info.nar_sha256) == (261, 808, NAR_SHA)
    assert [r.basename for r in info.references] == [
        "0123456789abcdfghijklmnpqrsvwxyz-withrefs", "4kjlw03g6drdjmkqnvaqnbp6nrm3v9pk-src"]
    assert info.deriver is not None
    assert info.deriver.basename == "zzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzz-withrefs.drv"
    assert [s.name for s in info.signatures] == ["test-1"] and len(info.signatures[0].data) == 64
    assert info.ca is None


def test_parses_ca_and_empty_references() -> None:
    info = narinfo.parse(NIX_CA_NARINFO)
    assert info.references == ()
    assert info.ca is not None and CA_KINDS[info.ca.hash_type] == ("fixed:r", "sha256")
    assert info.ca.digest == info.nar_sha256


def test_render_gives_back_nix_text() -> None:
    assert narinfo.render(parsed()).encode() == NIX_NARINFO
    assert narinfo.render(narinfo.parse(NIX_CA_NARINFO)).encode() == NIX_CA_NARINFO


@pytest.mark.parametrize("form", [
    "sha256:" + NAR_SHA.hex(),
    "sha256:" + base64.b64encode(NAR_SHA).decode(),
    "sha256-" + base64.b64encode(NAR_SHA).decode(),
])
def test_hash_forms_nix_accepts_are_normalised(form: str) -> None:
    text = replace_line(NIX_NARINFO, b"NarHash", f"NarHash: {form}".encode())
    info = narinfo.parse(text)
    assert info.nar_sha256 == NAR_SHA
    assert narinfo.fingerprint(info) == NIX_FINGERPRINT  # signed form is always nixbase32


def test_missing_compression_means_bzip2_and_unused_fields_are_skipped() -> None:
    text = replace_line(NIX_NARINFO, b"Compression", None) + b"System: x86_64-linux\nFutureField: 1\n"
    assert narinfo.parse(text).compression == "bzip2"


def test_unordered_and_repeated_references_are_held_as_nix_holds_them() -> None:
    line = (b"References: 4kjlw03g6drdjmkqnvaqnbp6nrm3v9pk-src 0123456789abcdfghijklmnpqrsvwxyz-withrefs "
            b"4kjlw03g6drdjmkqnvaqnbp6nrm3v9pk-src")
    info = narinfo.parse(replace_line(NIX_NARINFO, b"References", line))
    assert narinfo.fingerprint(info) == NIX_FINGERPRINT


@pytest.mark.parametrize(("text", "message"), [
    (NIX_NARINFO[:-1], "does not end with a newline"),
    (NIX_NARINFO + b"\n", "line 11 '' is not 'Key: value'"),
    (NIX_NARINFO.replace(b"NarSize: 808", b"NarSize:808"), "line 7 'NarSize:808' is not 'Key: value'"),
    (NIX_NARINFO.replace(b"\n", b"\r\n"), "control character"),
    (NIX_NARINFO + b"NarSize: 808\n", "line 11 'NarSize: 808' repeats NarSize (first on line 7)"),
    (replace_line(NIX_NARINFO, b"StorePath", None), "has no StorePath line"),
    (replace_line(NIX_NARINFO, b"URL", None), "has no URL line"),
    (replace_line(NIX_NARINFO, b"NarHash", None), "has no NarHash line"),
    (replace_line(NIX_NARINFO, b"NarSize", None), "has no NarSize line"),
    (replace_line(NIX_NARINFO, b"StorePath", b"StorePath: /gnu/store/0123456789abcdfghijklmnpqrsvwxyz-x"),
     "line 1 'StorePath: /gnu/store/0123456789abcdfghijklmnpqrsvwxyz-x': store path"),
    (replace_line(NIX_NARINFO, b"StorePath", b"StorePath: /nix/store/e123456789abcdfghijklmnpqrsvwxyz-x"),
     "bad hash part"),
    (replace_line(NIX_NARINFO, b"NarSize", b"NarSize: 0"), "NarSize is 0"),
    (replace_line(NIX_NARINFO, b"NarSize", b"NarSize: -5"), "not a decimal number"),
    (replace_line(NIX_NARINFO, b"NarSize", b"NarSize: 18446744073709551616"), "64 bits"),
    (replace_line(NIX_NARINFO, b"FileSize", b"FileSize: 1e3"), "line 5 'FileSize: 1e3': not a decimal"),
    (replace_line(NIX_NARINFO, b"NarHash", b"NarHash: sha1:" + b"00" * 20), "only sha256"),
    (replace_line(NIX_NARINFO, b"NarHash", b"NarHash: sha256:abc"), "length of no encoding"),
    (replace_line(NIX_NARINFO, b"NarHash", b"NarHash: 1c3hndm4qfr458n9cyda2flk3qr4vjmkqcddcdp44zip75zs7x1s"),
     "does not start with md5, sha1, sha256"),
    (replace_line(NIX_NARINFO, b"NarHash", b"NarHash: sha256:" + b"e" * 52), "invalid character 'e'"),
    (replace_line(NIX_NARINFO, b"References", b"References: not-a-path"), "line 8 'References: not-a-path'"),
    (replace_line(NIX_NARINFO, b"Deriver", b"Deriver: zzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzz-withrefs"),
     "not a .drv store path"),
    (replace_line(NIX_NARINFO, b"Sig", b"Sig: test-1"), "not '<key name>:<base64>'"),
    (replace_line(NIX_NARINFO, b"Sig", b"Sig: test-1:AAAA"), "is 3 bytes, not 64"),
    (replace_line(NIX_NARINFO, b"Sig", b"Sig: test-1:not base64!"), "not base64"),
    (NIX_NARINFO + b"CA: fixed:git:sha1:" + b"0" * 32 + b"\n", "content address kind 'fixed:git:sha1'"),
    (NIX_NARINFO + b"CA: text:sha256:abc\n", "length of no encoding of 32 bytes"),
    (replace_line(NIX_NARINFO, b"URL", b"URL: file:///etc/passwd"), "URL scheme 'file'"),
    (replace_line(NIX_NARINFO, b"URL", b"URL: nar/a b"), "URL is empty or has spaces"),
    (replace_line(NIX_NARINFO, b"Compression", b"Compression: x z"), "one word"),
    (b"\xff" + NIX_NARINFO, "not UTF-8"),
    (b"A: " + b"x" * (1 << 20) + b"\n", "more than 1048576"),
])
def test_malformed_narinfo_is_refused_with_the_line(text: bytes, message: str) -> None:
    with pytest.raises(InvalidData) as caught:
        narinfo.parse(text, "http://cache/x.narinfo")
    assert str(caught.value).startswith("http://cache/x.narinfo: ")
    assert message in str(caught.value)


def test_unknown_deriver_means_none() -> None:
    text = replace_line(NIX_NARINFO, b"Deriver", b"Deriver: unknown-deriver")
    assert narinfo.parse(text).deriver is None


# -- fingerprint and PathInfo ------------------------------------------------------------


def test_fingerprint_is_nixs() -> None:
    assert narinfo.fingerprint(parsed()) == NIX_FINGERPRINT
    assert narinfo.fingerprint(narinfo.parse(NIX_CA_NARINFO)) == (
        b"1;/nix/store/4kjlw03g6drdjmkqnvaqnbp6nrm3v9pk-src;"
        b"sha256:16fz4aldbsvfavi7ivf290aypw8f8fmdgwlchxfrpkf9n94810zv;1424;"
    )


def test_pathinfo_keeps_every_field_and_agrees_with_castore() -> None:
    info = parsed()
    root = DirectoryNode(b"", bytes(32), 6)
    path_info = narinfo.to_pathinfo(info, root)
    assert validate_pathinfo(path_info) == info.store_path
    assert path_info.node == dataclasses.replace(root, name=info.store_path.basename.encode())
    assert path_info.references == tuple(r.digest for r in info.references)
    assert path_info.narinfo is not None
    assert path_info.narinfo.reference_names == tuple(r.basename for r in info.references)
    assert path_info.narinfo.deriver == ("withrefs", nixbase32.decode("z" * 32))
    assert path_info.narinfo.signatures == info.signatures
    assert (path_info.narinfo.nar_size, path_info.narinfo.nar_sha256) == (808, NAR_SHA)
    assert narinfo_fingerprint(path_info).encode() == NIX_FINGERPRINT
    ca = narinfo.parse(NIX_CA_NARINFO)
    ca_info = narinfo.to_pathinfo(ca, FileNode(b"", bytes(32), 3))
    assert ca_info.narinfo is not None and ca_info.narinfo.ca == ca.ca


# -- keys and signatures ---------------------------------------------------------------------


def test_keys_and_signatures_match_nix() -> None:
    secret = signing.parse_secret_key(NIX_SECRET_KEY)
    assert str(secret.public()) == NIX_PUBLIC_KEY
    info = parsed()
    assert secret.sign(narinfo.fingerprint(info)) == info.signatures[0]  # ed25519 is deterministic
    key = signing.parse_public_key(NIX_PUBLIC_KEY)
    assert signing.check_signatures(info, [key], "w") == key


def test_signature_by_a_trusted_key_among_others_counts() -> None:
    key = signing.parse_public_key(NIX_PUBLIC_KEY)
    stranger = Signature("cache.example.org-1", bytes(64))
    info = dataclasses.replace(parsed(), signatures=(stranger, *parsed().signatures))
    other = signing.PublicKey("cache.example.org-1", hashlib.sha256(b"k").digest())
    assert signing.check_signatures(info, [other, key], "w") == key


@pytest.mark.parametrize("change",
                         ["nar_size", "nar_sha256", "references", "store_path", "no_sigs", "other_key"])
def test_untrusted_narinfo_is_refused_naming_path_and_keys(change: str) -> None:
    info = parsed()
    key = signing.parse_public_key(NIX_PUBLIC_KEY)
    keys = [key]
    if change == "nar_size":
        info = dataclasses.replace(info, nar_size=809)
    elif change == "nar_sha256":
        info = dataclasses.replace(info, nar_sha256=hashlib.sha256(b"x").digest())
    elif change == "references":
        info = dataclasses.replace(info, references=info.references[1:])
    elif change == "store_path":
        info = dataclasses.replace(info, store_path=StorePath(info.store_path.digest, "withrefz"))
    elif change == "no_sigs":
        info = dataclasses.replace(info, signatures=())
    else:
        keys = [signing.PublicKey("test-1", _public_of(bytes(32)))]  # same name, another key
    with pytest.raises(signing.UntrustedError) as caught:
        signing.check_signatures(info, keys, "http://c/x.narinfo")
    text = str(caught.value)
    assert text.startswith(f"http://c/x.narinfo: {info.store_path} has no valid signature")
    assert "(tried test-1)" in text
    assert ("carries no signature" in text) if change == "no_sigs" else ("do not verify" in text)


def test_signatures_by_unknown_keys_are_said_so() -> None:
    other = signing.PublicKey("cache.example.org-1", _public_of(b"\1" * 32))
    unknown = r"tried cache.example.org-1.*by test-1 are by no trusted"
    with pytest.raises(signing.UntrustedError, match=unknown):
        signing.check_signatures(parsed(), [other], "w")
    with pytest.raises(signing.UntrustedError, match=r"tried none"):
        signing.check_signatures(parsed(), [], "w")


def _public_of(seed: bytes) -> bytes:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    return Ed25519PrivateKey.from_private_bytes(seed).public_key().public_bytes_raw()


def test_public_keys_parse_like_nix_conf() -> None:
    keys = signing.parse_public_keys(
        f"  {NIX_PUBLIC_KEY}\tcache.nixos.org-1:6NCHdD59X431o0gWypbMrAURkbJ16ZPMQFGspcDShjY=\n")
    assert [k.name for k in keys] == ["test-1", "cache.nixos.org-1"]
    assert signing.parse_public_keys("") == ()


@pytest.mark.parametrize(("text", "message"), [
    ("test-1", "is not '<name>:<base64>'"),
    (":XFiknhNGw9Gg4sR4vGsBpBLXAiXOLkdXHzZEZ3eVfY4=", "is not '<name>:<base64>'"),
    ("test-1:XFik", "3 bytes, not 32"),
    ("test-1:XFiknhNGw9Gg4sR4vGsBpBLXAiXOLkdXHzZEZ3eVfY4", "not base64"),
    (NIX_SECRET_KEY, "64 bytes, not 32"),
])
def test_bad_public_keys_are_refused(text: str, message: str) -> None:
    with pytest.raises(InvalidArgument, match=message.replace("(", r"\(").replace(")", r"\)")):
        signing.parse_public_key(text)


def test_secret_key_halves_must_agree() -> None:
    raw = base64.b64decode(NIX_SECRET_KEY.split(":")[1])
    broken = "test-1:" + base64.b64encode(raw[:32] + bytes(32)).decode()
    with pytest.raises(InvalidArgument, match="second half is not the public key"):
        signing.parse_secret_key(broken)
