"""Tensor parallelism inside one worker: rank group, sharding transform over the plain model, collectives."""
