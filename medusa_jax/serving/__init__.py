"""Serving: fixed decode slots (slots), the request scheduler (scheduler), the HTTP server (server)."""
