"""Sparkplug B 3.0 payloads for the upstream (work in progress: issue 14, not wired into the daemon yet).

`sparkplug_b_pb2` is generated from the official `sparkplug_b.proto` (eclipse/tahu, EPL-2.0) by
`python -m grpc_tools.protoc --proto_path=. --python_out=. --pyi_out=. sparkplug_b.proto` in this
directory (`bench/`-free: see docs/development.md); never edited by hand. It needs the `protobuf`
package (the `[sparkplug]` extra), imported only when `upstream.format: sparkplug_b`.
"""
