"""Generates the pdserve.v1 Python modules from the .proto via grpcio-tools (`make proto`, first import)."""
from __future__ import annotations

import sys
from pathlib import Path

PROTO_DIR = Path(__file__).resolve().parent  # proto/
REPO_ROOT = PROTO_DIR.parent


def generate() -> None:
    from grpc_tools import protoc  # build-time dependency (grpcio-tools)

    # -I at the repo root makes the generated imports read `from proto.pdserve.v1 import ...`.
    protos = sorted(str(p.relative_to(REPO_ROOT)) for p in (PROTO_DIR / "pdserve" / "v1").glob("*.proto"))
    include = Path(protoc.__file__).resolve().parent / "_proto"
    args = ["protoc", f"-I{REPO_ROOT}", f"-I{include}", f"--python_out={REPO_ROOT}", f"--pyi_out={REPO_ROOT}",
            f"--grpc_python_out={REPO_ROOT}", *protos]
    if protoc.main(args) != 0:
        raise RuntimeError("protoc failed on proto/pdserve/v1/*.proto: see the message above")


if __name__ == "__main__":
    try:
        generate()
    except RuntimeError as e:
        sys.exit(str(e))
