"""Ray actor that receives KV into reserved blocks and decodes with continuous batching."""
