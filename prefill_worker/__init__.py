"""Ray actor that prefills prompts in chunks and streams their KV, layer by layer, to a decode worker."""
