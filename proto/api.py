"""The generated pdserve.v1 modules (`from proto.api import pb, pb_grpc`); builds them if missing."""
from __future__ import annotations

try:
    from proto.pdserve.v1 import pdserve_pb2 as pb
    from proto.pdserve.v1 import pdserve_pb2_grpc as pb_grpc
except ImportError:  # fresh checkout without `make proto`: build once, then import
    from proto.build import generate

    generate()
    from proto.pdserve.v1 import pdserve_pb2 as pb
    from proto.pdserve.v1 import pdserve_pb2_grpc as pb_grpc

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["PDServe"].full_name

__all__ = ["pb", "pb_grpc", "SERVICE_NAME"]
