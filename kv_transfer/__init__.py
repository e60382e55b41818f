"""KV transfer between prefill and decode workers: layout, frames, channels, sender/receiver."""
