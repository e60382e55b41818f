"""Generated gRPC/protobuf code for pdserve.v1 (built from the .proto by grpcio-tools, never committed)."""
