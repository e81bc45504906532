"""The OpenAI-compatible HTTP server over the runtime's scheduler."""
