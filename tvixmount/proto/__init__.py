"""Protobuf and gRPC modules generated from protos/ (see protos/generate.py)."""
