"""Serving: ``hd4k serve``, the OpenAI-compatible HTTP server over any Runner."""
