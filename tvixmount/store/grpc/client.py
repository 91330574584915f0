"""The gRPC store backend: a tvix-store daemon (ours or tvix's) as the three services.

``tvixmount.store`` dispatches ``grpc+http://host:port``,
``grpc+https://host:port`` and ``grpc+unix:///socket`` here by module name
and calls ``open_blob_service(url)`` and friends with the parsed URL.

Each service owns an Endpoint (channel.py) whose channel is made on
first use, in the process that uses it; ``?wait-connect=1`` connects at
open time instead and fails with Unavailable if the server is not there.
The other pieces are listed in the package's docstring (``__init__.py``).
"""

from __future__ import annotations

from ..urls import GRPC_SCHEMES, StoreUrl, parse
from .blobs import GrpcBlobService
from .channel import ClientConfig, Endpoint
from .deadline import request_deadline
from .directories import GrpcDirectoryService
from .pathinfo import GrpcPathInfoService

__all__ = [
    "ClientConfig",
    "GrpcBlobService",
    "GrpcDirectoryService",
    "GrpcPathInfoService",
    "open_blob_service",
    "open_directory_service",
    "open_path_info_service",
    "request_deadline",
]


def _endpoint(url: StoreUrl | str, config: ClientConfig | None) -> Endpoint:
    parsed = parse(url) if isinstance(url, str) else url
    if parsed.scheme not in GRPC_SCHEMES:
        from ...errors import InvalidArgument

        raise InvalidArgument(f"store URL {parsed.text!r} is not a grpc+http, grpc+https or grpc+unix URL")
    return Endpoint(parsed, config)


def open_blob_service(url: StoreUrl | str, config: ClientConfig | None = None) -> GrpcBlobService:
    return GrpcBlobService(_endpoint(url, config))


def open_directory_service(url: StoreUrl | str, config: ClientConfig | None = None) -> GrpcDirectoryService:
    return GrpcDirectoryService(_endpoint(url, config))


def open_path_info_service(url: StoreUrl | str, config: ClientConfig | None = None) -> GrpcPathInfoService:
    return GrpcPathInfoService(_endpoint(url, config))
