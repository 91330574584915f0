"""What the built package holds and promises: units, LICENSE, ``python -m tvixmount``, capped deps.

The wheel is built for real from a copy of the source (pip, no network, no
build isolation), so a unit file left out of package_data or a LICENSE that
the metadata does not name fails here, not on an operator's machine.
"""

from __future__ import annotations

import configparser
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

from tvixmount import __version__, systemd

ROOT = Path(__file__).resolve().parents[2]


def test_wheel_ships_units_license_and_main(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for name in ("setup.cfg", "pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(ROOT / name, src / name)
    for package in ("tvixmount", "workers"):
        shutil.copytree(ROOT / package, src / package, ignore=shutil.ignore_patterns("__pycache__"))
    pip = [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation"]
    result = subprocess.run([*pip, "-w", str(tmp_path / "dist"), str(src)], capture_output=True, text=True,
                            timeout=240)
    assert result.returncode == 0, result.stderr
    (wheel,) = (tmp_path / "dist").glob("tvixmount-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        for unit in systemd.UNITS:
            assert f"tvixmount/systemd/{unit}" in names
        assert "tvixmount/__main__.py" in names
        dist_info = f"tvixmount-{__version__}.dist-info"
        licenses = [n for n in names if n.startswith(dist_info) and n.endswith("LICENSE")]
        assert licenses and zf.read(licenses[0]) == (ROOT / "LICENSE").read_bytes()
        metadata = zf.read(f"{dist_info}/METADATA").decode()
    assert re.search(r"^License(-Expression)?: MIT$", metadata, re.M), metadata[:800]
    assert (ROOT / "LICENSE").read_text().startswith("MIT License")


def test_generated_code_dependencies_are_capped():
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    requires = {re.split(r"[<>=!~ ]", line)[0]: line
                for line in cfg["options"]["install_requires"].split("\n") if line.strip()}
    assert "<8" in requires["protobuf"]
    for name in ("grpcio", "grpcio-health-checking", "grpcio-reflection"):
        assert "<2" in requires[name], requires[name]
    grpc_floor = re.search(r">=([\d.]+)", requires["grpcio"])[1]  # type: ignore[index]
    for name in ("grpcio-health-checking", "grpcio-reflection"):
        assert re.search(r">=([\d.]+)", requires[name])[1] == grpc_floor  # type: ignore[index]


def test_python_m_tvixmount_is_the_command():
    result = subprocess.run([sys.executable, "-m", "tvixmount", "--version"], capture_output=True, text=True,
                            timeout=60, cwd=ROOT)
    assert result.returncode == 0 and result.stdout.strip() == f"tvixmount {__version__}"
    result = subprocess.run([sys.executable, "-m", "tvixmount", "--help"], capture_output=True, text=True,
                            timeout=60, cwd=ROOT)
    assert result.returncode == 0 and "usage: tvixmount" in result.stdout
    result = subprocess.run([sys.executable, "-m", "tvixmount", "/nonexistent-mountpoint"],
                            capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert result.returncode == 2 and result.stderr.startswith("tvixmount: error:"), result.stderr
