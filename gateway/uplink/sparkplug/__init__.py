"""Sparkplug B 3.0 to the upstream: `metrics` (names, aliases, datatypes, payloads) and `uplink`.

`sparkplug_b_pb2` is generated from the official `sparkplug_b.proto` (eclipse/tahu, EPL-2.0) by
`python -m grpc_tools.protoc --proto_path=. --python_out=. --pyi_out=. sparkplug_b.proto` in this
directory; never edited by hand. It needs the `protobuf`
package (the `[sparkplug]` extra), imported only when `upstream.format: sparkplug_b`.
"""
