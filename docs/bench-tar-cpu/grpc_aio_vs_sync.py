"""The server's CPU per call: grpc's thread-pool server against its asyncio server (stop 28).

One process serves, one calls; grpc_aio_vs_sync.sh runs the pair, alternating the
kinds. The method streams ``MESSAGES`` raw messages of ``PAYLOAD`` bytes per call
(no protobuf on either side), so what differs is grpc's own per-call and per-message
Python. Usage::

    python grpc_aio_vs_sync.py sync|aio server PORT PAYLOAD MESSAGES   # prints "ready", then
                                                                         # its CPU seconds on a line in
    python grpc_aio_vs_sync.py CALLS client PORT                       # 8 threads, CALLS in all
"""

from __future__ import annotations

import asyncio
import os
import resource
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import grpc


def _same(data: bytes) -> bytes:
    return data


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _serve_threads(port: int, data: bytes, messages: int) -> None:
    def read(request: bytes, context: grpc.ServicerContext):  # type: ignore[no-untyped-def]
        for _ in range(messages):
            yield data

    handler = grpc.method_handlers_generic_handler(
        "t.S", {"Read": grpc.unary_stream_rpc_method_handler(read, _same, _same)})
    server = grpc.server(ThreadPoolExecutor(32), handlers=[handler])
    server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    print("ready", flush=True)
    sys.stdin.readline()
    print("cpu", round(_cpu(), 3), flush=True)


async def _serve_asyncio(port: int, data: bytes, messages: int) -> None:
    async def read(request: bytes, context: grpc.aio.ServicerContext):  # type: ignore[no-untyped-def]
        for _ in range(messages):
            yield data

    handler = grpc.method_handlers_generic_handler(
        "t.S", {"Read": grpc.unary_stream_rpc_method_handler(read, _same, _same)})
    server = grpc.aio.server()
    server.add_generic_rpc_handlers([handler])
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    print("ready", flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
    print("cpu", round(_cpu(), 3), flush=True)


def _call(port: int, calls: int) -> None:
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    method = channel.unary_stream("/t.S/Read", request_serializer=_same, response_deserializer=_same)

    def some(count: int) -> None:
        for _ in range(count):
            for _message in method(b"x"):
                pass

    started = time.time()
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(some, [calls // 8] * 8))
    print("client wall", round(time.time() - started, 3), "cpu", round(_cpu(), 3))


def main() -> None:
    mode, role, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
    if role == "client":
        _call(port, int(mode))
        return
    data, messages = os.urandom(int(sys.argv[4])), int(sys.argv[5])
    if mode == "sync":
        _serve_threads(port, data, messages)
    else:
        asyncio.run(_serve_asyncio(port, data, messages))


if __name__ == "__main__":
    main()
