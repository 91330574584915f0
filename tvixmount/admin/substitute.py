"""``tvixstore substitute``: store paths and their closures from a binary cache, ahead of time.

What a mount does lazily, path by path, done before anyone reads: a farm
warms a builder's store before its jobs start. The work is the mount's
(store/nixhttp: the same checks, the same one download per path across
processes sharing the store, nothing visible before it verified); this
module adds the closure and the reporting:

1. the closure is found first, from narinfos alone (small, signed, checked
   as for a substitution) for paths the store lacks, and from the stored
   PathInfos for paths it has: so ``--dry-run`` downloads no NAR, and the
   totals of the progress bars are known before the first NAR;
2. paths are substituted references first, so a path that becomes visible
   has its closure present (a reference may be itself: skipped);
3. a path that fails (not in the cache, bad signature, bad NAR) is one
   error line; the paths that refer to it are not substituted (their
   closure would be incomplete) and are reported as such.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

from ..castore.storepath import StorePath
from ..errors import TvixError
from ..store.nixhttp.narinfo import NarinfoFile
from ..store.nixhttp.service import NixHttpPathInfoService
from .progress import Bar, NullBar

log = logging.getLogger(__name__)


@dataclass(slots=True)
class Plan:
    """The closure of the paths asked for: what to fetch (references first), what is there already."""

    fetch: list[NarinfoFile] = field(default_factory=list)
    present: list[StorePath] = field(default_factory=list)
    failed: dict[StorePath, str] = field(default_factory=dict)  # path -> why

    @property
    def nar_bytes(self) -> int:
        return sum(info.nar_size for info in self.fetch)

    @property
    def download_bytes(self) -> int | None:
        sizes = [info.file_size for info in self.fetch]
        return None if any(size is None for size in sizes) else sum(size or 0 for size in sizes)


@dataclass(slots=True)
class Outcome:
    substituted: list[StorePath] = field(default_factory=list)
    present: int = 0
    nar_bytes: int = 0
    downloaded: int = 0
    failed: dict[StorePath, str] = field(default_factory=dict)

    def summary(self, seconds: float) -> str:
        rate = self.nar_bytes / seconds if seconds > 0 else 0.0
        return (f"substituted {len(self.substituted)} paths ({self.nar_bytes / 1e6:.1f} MB of NAR, "
                f"{self.downloaded / 1e6:.1f} MB downloaded, {rate / 1e6:.1f} MB/s), "
                f"{self.present} already present, {len(self.failed)} failed, in {seconds:.2f} s")


def plan(service: NixHttpPathInfoService, roots: Iterable[StorePath]) -> Plan:
    """The closure of ``roots`` (see the module doc, step 1); downloads no NAR."""
    result = Plan()
    order: list[NarinfoFile] = []  # post-order: references before their referrers
    state: dict[StorePath, str] = {}  # "open" while its references are walked, then "done"
    stack: list[tuple[StorePath, list[StorePath] | None]] = [(root, None) for root in reversed(list(roots))]
    infos: dict[StorePath, NarinfoFile] = {}
    while stack:
        path, refs = stack.pop()
        if refs is None:
            if path in state:
                continue
            state[path] = "open"
            refs = _references(service, path, result, infos)
            stack.append((path, refs))
            continue
        pending = [ref for ref in refs if ref not in state]
        if pending:
            stack.append((path, refs))
            stack.extend((ref, None) for ref in reversed(pending))
            continue
        state[path] = "done"
        broken = next((ref for ref in refs if ref in result.failed), None)
        if broken is not None and path not in result.failed:
            result.failed[path] = f"not substituted: its reference {broken} failed"
        if path in infos and path not in result.failed:
            order.append(infos[path])
    result.fetch = order
    return result


def _references(service: NixHttpPathInfoService, path: StorePath, result: Plan,
                infos: dict[StorePath, NarinfoFile]) -> list[StorePath]:
    """The path's references other than itself, from the store or the cache; [] when it failed."""
    try:
        stored = service.get_present(path.digest)
        if stored is not None:
            result.present.append(path)
            names = stored.narinfo.reference_names if stored.narinfo is not None else ()
            refs = [StorePath(digest, name.split("-", 1)[1])
                    for digest, name in zip(stored.references, names, strict=False)]
        else:
            info = service.narinfo(path)
            if info is None:
                result.failed[path] = f"not in the cache {service.config.base_url}"
                return []
            infos[path] = info
            refs = list(info.references)
    except TvixError as exc:
        result.failed[path] = str(exc)
        return []
    return [ref for ref in refs if ref != path]


class _Shown:
    """Progress of the NAR bytes of the paths being substituted, on a bar."""

    def __init__(self, nar_bar: Bar) -> None:
        self.bar = nar_bar

    def started(self, info: NarinfoFile) -> None:
        self.bar.set_postfix_str(info.store_path.name)

    def nar_bytes(self, n: int) -> None:
        self.bar.update(n)

    def finished(self, info: NarinfoFile, seconds: float) -> None:
        return None


def substitute(service: NixHttpPathInfoService, planned: Plan, paths_bar: Bar | None = None,
               nar_bar: Bar | None = None) -> Outcome:
    """Substitute what ``planned`` says to fetch, references first (step 2 and 3)."""
    outcome = Outcome(present=len(planned.present), failed=dict(planned.failed))
    shown = _Shown(nar_bar or NullBar())
    paths_bar = paths_bar or NullBar()
    for info in planned.fetch:
        path = info.store_path
        broken = next((ref for ref in info.references if ref in outcome.failed and ref != path), None)
        if broken is not None:
            outcome.failed[path] = f"not substituted: its reference {broken} failed"
            continue
        try:
            stored = service.substitute(path, time.monotonic() + service.config.timeout, shown)
        except TvixError as exc:
            outcome.failed[path] = str(exc)
            log.debug("substituting %s failed: %s", path, exc)
        else:
            if stored is None:
                outcome.failed[path] = f"gone from the cache {service.config.base_url} meanwhile"
            else:
                outcome.substituted.append(path)
                outcome.nar_bytes += info.nar_size
                outcome.downloaded += info.file_size or 0
        paths_bar.update(1)
    return outcome
