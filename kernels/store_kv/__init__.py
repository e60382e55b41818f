"""The KV store: the one entry point per backend that writes new k, v rows into the paged cache."""
