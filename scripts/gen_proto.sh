#!/usr/bin/env bash
# Regenerates the Python stubs of the Open Inference Protocol's gRPC service from
# service/proto/grpc_predict_v2.proto, with grpcio-tools (requirements/lock.txt pins it; the
# generated files are committed, so serving needs grpcio and protobuf only).
# Run from anywhere: bash scripts/gen_proto.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}"
# -I . with the proto under service/proto/: the generated _grpc module imports its messages as
# `from service.proto import grpc_predict_v2_pb2`, a package-absolute import that works installed.
"$PYTHON" -m grpc_tools.protoc -I . \
  --python_out=. --pyi_out=. --grpc_python_out=. \
  service/proto/grpc_predict_v2.proto
echo "regenerated service/proto/grpc_predict_v2_pb2{.py,.pyi,_grpc.py}"
