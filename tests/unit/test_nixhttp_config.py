"""``nix+http(s)://`` URLs: what is accepted, what each parameter means, what is refused."""

from __future__ import annotations

import pytest

from tvixmount.errors import InvalidArgument
from tvixmount.store.nixhttp import parse_url
from tvixmount.store.nixhttp.config import DEFAULT_NEGATIVE_TTL, DEFAULT_TIMEOUT

NIXOS = "cache.nixos.org-1:6NCHdD59X431o0gWypbMrAURkbJ16ZPMQFGspcDShjY="
COMMUNITY = "nix-community.cachix.org-1:mB9FSh9qf2dCimDSUo8Zy7bkq5CX+/rkCWyvRCYg3Fs="  # has '+' and '/'


def test_defaults_and_base_url() -> None:
    config = parse_url("nix+https://cache.nixos.org")
    assert config.base_url == "https://cache.nixos.org"
    assert config.trusted_keys is None  # not checked (the mount warns)
    assert (config.negative_ttl, config.timeout) == (DEFAULT_NEGATIVE_TTL, DEFAULT_TIMEOUT)
    assert parse_url("nix+http://[::1]:8080/some/path/").base_url == "http://[::1]:8080/some/path"


def test_keys_as_pasted_from_nix_conf_and_as_tvix_writes_them() -> None:
    pasted = parse_url(f"nix+https://h/?trusted-public-keys={NIXOS} {COMMUNITY}")
    escaped = parse_url(f"nix+https://h/?trusted-public-keys={NIXOS}%20{COMMUNITY.replace('+', '%2B')}")
    assert pasted.trusted_keys == escaped.trusted_keys
    assert pasted.trusted_keys is not None
    assert [str(k) for k in pasted.trusted_keys] == [NIXOS, COMMUNITY]
    assert parse_url("nix+https://h?trusted-public-keys=").trusted_keys == ()  # trusts nobody


def test_timings() -> None:
    config = parse_url("nix+http://h?negative-ttl=0&timeout=2.5")
    assert (config.negative_ttl, config.timeout) == (0.0, 2.5)


@pytest.mark.parametrize(("url", "message"), [
    ("http://h", "must start with nix+http:// or nix+https://"),
    ("nix+ftp://h", "must start with nix+http://"),
    ("nix+http://", "has no host"),
    ("nix+http://h:99999", "bad port"),
    ("nix+http://h#frag", "fragment"),
    ("nix+http://h?trusted-public-keys=broken", "trusted-public-keys: public key 'broken'"),
    ("nix+http://h?trusted-public-keys=k:AAAA", "3 bytes, not 32"),
    ("nix+http://h?negative-ttl=-1", "negative-ttl='-1' is not a number of seconds >= 0"),
    ("nix+http://h?negative-ttl=nan", "is not a number"),
    ("nix+http://h?timeout=0", "timeout='0' is not a number of seconds > 0"),
    ("nix+http://h?compression=xz", "unknown parameter 'compression'"),
    ("nix+http://h?timeout", "has no '=VALUE'"),
    ("nix+http://h?timeout=1&timeout=2", "given twice"),
    ("nix+http://h\n", "control character"),
])
def test_bad_urls_are_refused(url: str, message: str) -> None:
    with pytest.raises(InvalidArgument, match=message.replace("(", r"\(").replace("+", r"\+")):
        parse_url(url)


def test_credentials_never_reach_a_message() -> None:
    with pytest.raises(InvalidArgument) as caught:
        parse_url("nix+https://farm:secret@h?timeout=x")
    assert "secret" not in str(caught.value) and "***@h" in str(caught.value)
