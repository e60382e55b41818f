"""The router's OpenAI-compatible HTTP door (FastAPI on uvicorn), a second face of the same request flow."""
