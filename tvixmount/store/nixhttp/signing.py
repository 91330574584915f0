"""Ed25519 keys in Nix's notation, and the signature check of a narinfo.

Nix writes a public key as ``<name>:<base64 of 32 bytes>`` (``nix key
convert-secret-to-public``), a secret key as ``<name>:<base64 of 64 bytes>``
(the 32-byte seed followed by the public key, ``nix key generate-secret``),
and a signature as ``<name>:<base64 of 64 bytes>`` over the narinfo's
fingerprint. A signature counts only when its name is a trusted key's name
and it verifies under that key; signatures by other keys are ignored, as
Nix ignores them, so a cache may carry several.

The cryptography is ``cryptography``'s Ed25519 (OpenSSL), never our own.
It is imported where it is used, so naming a cache (config.py, which the
mount's dispatcher runs to check a URL) loads no OpenSSL.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Iterable
from dataclasses import dataclass

from ...castore.pathinfo import Signature
from ...errors import InvalidArgument, InvalidData
from .narinfo import NarinfoFile, fingerprint

PUBLIC_KEY_LEN = 32
SECRET_KEY_LEN = 64


class UntrustedError(InvalidData):
    """A narinfo without a valid signature by any trusted key (EIO at the edge)."""


@dataclass(frozen=True, slots=True)
class PublicKey:
    name: str
    raw: bytes  # 32 bytes

    def __str__(self) -> str:
        return f"{self.name}:{base64.b64encode(self.raw).decode()}"

    def verifies(self, message: bytes, signature: Signature) -> bool:
        """Whether ``signature`` is this key's (same name) valid signature of ``message``."""
        if signature.name != self.name:
            return False
        from cryptography.exceptions import InvalidSignature
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

        try:
            Ed25519PublicKey.from_public_bytes(self.raw).verify(signature.data, message)
        except InvalidSignature:
            return False
        return True


@dataclass(frozen=True, slots=True)
class SecretKey:
    name: str
    raw: bytes  # 64 bytes: seed, then the public key

    def public(self) -> PublicKey:
        return PublicKey(self.name, self.raw[32:])

    def sign(self, message: bytes) -> Signature:
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

        data = Ed25519PrivateKey.from_private_bytes(self.raw[:32]).sign(message)
        return Signature(self.name, data)


def _split(text: str, length: int, what: str) -> tuple[str, bytes]:
    name, sep, data = text.strip().partition(":")
    if not sep or not name:
        raise InvalidArgument(f"{what} {text!r} is not '<name>:<base64>'")
    try:
        raw = base64.b64decode(data, validate=True)
    except (ValueError, binascii.Error) as exc:
        raise InvalidArgument(f"{what} {name!r}: key is not base64 ({exc})") from None
    if len(raw) != length:
        raise InvalidArgument(f"{what} {name!r}: key is {len(raw)} bytes, not {length} (ed25519)")
    return name, raw


def parse_public_key(text: str) -> PublicKey:
    """One ``<name>:<base64>`` public key; InvalidArgument naming it when malformed."""
    name, raw = _split(text, PUBLIC_KEY_LEN, "public key")
    return PublicKey(name, raw)


def parse_public_keys(text: str) -> tuple[PublicKey, ...]:
    """Whitespace-separated public keys (Nix's ``trusted-public-keys`` notation)."""
    return tuple(parse_public_key(word) for word in text.split())


def parse_secret_key(text: str) -> SecretKey:
    """A secret key file's contents, as ``nix key generate-secret`` writes it."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    name, raw = _split(text, SECRET_KEY_LEN, "secret key")
    derived = Ed25519PrivateKey.from_private_bytes(raw[:32]).public_key().public_bytes_raw()
    if derived != raw[32:]:
        raise InvalidArgument(f"secret key {name!r}: its second half is not the public key of its seed")
    return SecretKey(name, raw)


def check_signatures(info: NarinfoFile, keys: Iterable[PublicKey], where: str) -> PublicKey:
    """The trusted key that signed ``info``; UntrustedError naming the path and the keys tried.

    Call before anything of the NAR is requested: nothing untrusted is
    downloaded or decompressed.
    """
    trusted = tuple(keys)
    message = fingerprint(info)
    for key in trusted:
        for signature in info.signatures:
            if key.verifies(message, signature):
                return key
    tried = ", ".join(key.name for key in trusted) or "none"
    if not info.signatures:
        found = "it carries no signature"
    else:
        names = ", ".join(sorted({sig.name for sig in info.signatures}))
        matching = {sig.name for sig in info.signatures} & {key.name for key in trusted}
        found = f"its signatures by {names} " + (
            "do not verify (tampered narinfo, or a different key under a trusted name)"
            if matching else "are by no trusted key"
        )
    raise UntrustedError(f"{where}: {info.store_path} has no valid signature by a trusted key "
                         f"(tried {tried}); {found}")
