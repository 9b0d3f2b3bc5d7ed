"""Generated stubs of the Open Inference Protocol gRPC service (scripts/gen_proto.sh)."""
