"""Model and data packages: fetching, verifying and caching them; dataset readers."""
