"""The committed protobuf modules are what protos/generate.py makes of the .proto files."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def test_generated_modules_match_the_proto_files():
    pytest.importorskip("grpc_tools", reason="grpcio-tools is a test extra; install .[test]")
    result = subprocess.run([sys.executable, str(ROOT / "protos" / "generate.py"), "--check"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, f"stale generated modules; run python protos/generate.py\n{result.stderr}"


def test_check_notices_a_stale_module(tmp_path):
    pytest.importorskip("grpc_tools", reason="grpcio-tools is a test extra; install .[test]")
    out = tmp_path / "proto"
    subprocess.run([sys.executable, str(ROOT / "protos" / "generate.py"), "--out", str(out)],
                   check=True, capture_output=True, timeout=120)
    (out / "castore_pb2.py").write_text((out / "castore_pb2.py").read_text() + "# edited\n")
    generate = str(ROOT / "protos" / "generate.py")
    result = subprocess.run([sys.executable, generate, "--check", "--out", str(out)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 1 and "castore_pb2.py" in result.stderr


def test_wire_names_are_tvix_names():
    from tvixmount.proto import rpc_blobstore_pb2, rpc_directory_pb2, rpc_pathinfo_pb2

    services = {
        s.full_name: sorted(m.name for m in s.methods)
        for mod in (rpc_blobstore_pb2, rpc_directory_pb2, rpc_pathinfo_pb2)
        for s in mod.DESCRIPTOR.services_by_name.values()
    }
    assert services == {
        "tvix.castore.v1.BlobService": ["Put", "Read", "Stat"],
        "tvix.castore.v1.DirectoryService": ["Get", "Put"],
        "tvix.store.v1.PathInfoService": ["CalculateNAR", "Get", "List", "Put"],
    }
