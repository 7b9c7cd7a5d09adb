"""Inference tools: generate (text to stdout), chat (terminal), serve (OpenAI-compatible HTTP API + web page)."""
