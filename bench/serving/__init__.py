"""The serving load generator: open-loop gRPC clients against a cluster, latency and goodput reports."""
