"""The mount's kernel readahead knob: found through mountinfo, written once by whoever comes first."""

from __future__ import annotations

import logging
import threading
from pathlib import Path

import pytest

from tvixmount.kernelra import KernelReadahead, mount_device, set_readahead

MNT = Path("/mnt/with space")
MOUNTINFO = (
    "22 1 0:20 / /mnt/with\\040space rw - fuse.tvixmount tvixmount rw\n"
    "23 22 0:45 / /mnt/with\\040space rw - fuse.tvixmount tvixmount rw\n"  # mounted on top: this one
    "24 1 8:1 / /other rw - ext4 /dev/sda1 rw\n"
)


@pytest.fixture
def machine(tmp_path: Path) -> tuple[Path, str]:
    """A fake /sys/class/bdi with the device's knob at the INIT's 128 KiB, and a mountinfo."""
    bdi = tmp_path / "bdi"
    (bdi / "0:45").mkdir(parents=True)
    (bdi / "0:45" / "read_ahead_kb").write_text("128\n")
    mountinfo = tmp_path / "mountinfo"
    mountinfo.write_text(MOUNTINFO)
    return bdi, str(mountinfo)


def test_the_device_is_the_top_mount_and_escapes_are_undone(machine: tuple[Path, str]) -> None:
    _, mountinfo = machine
    assert mount_device(MNT, mountinfo) == "0:45"
    assert mount_device(Path("/nowhere"), mountinfo) is None


def test_set_readahead_writes_the_knob_or_says_why_not(machine: tuple[Path, str],
                                                      caplog: pytest.LogCaptureFixture) -> None:
    bdi, mountinfo = machine
    caplog.set_level(logging.INFO, logger="tvixmount.kernelra")
    assert set_readahead(MNT, 1024, bdi, mountinfo)
    assert (bdi / "0:45" / "read_ahead_kb").read_text() == "1024\n"
    assert "128 KiB -> 1024 KiB" in caplog.text
    assert not set_readahead(Path("/nowhere"), 1024, bdi, mountinfo)
    assert "is not in" in caplog.text


def test_the_knob_is_written_once_whoever_asks_first(machine: tuple[Path, str],
                                                     caplog: pytest.LogCaptureFixture) -> None:
    bdi, mountinfo = machine
    caplog.set_level(logging.INFO, logger="tvixmount.kernelra")
    ra = KernelReadahead(MNT, 1024, bdi, mountinfo)
    threads = [threading.Thread(target=ra.apply) for _ in range(8)]  # callers racing
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert (bdi / "0:45" / "read_ahead_kb").read_text() == "1024\n"
    assert caplog.text.count("kernel readahead of") == 1
    (bdi / "0:45" / "read_ahead_kb").write_text("128\n")  # someone else changed it later: left alone
    ra.apply()
    assert (bdi / "0:45" / "read_ahead_kb").read_text() == "128\n"
