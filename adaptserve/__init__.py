"""adaptserve: adapt a small open LLM to a domain, export it for cheap hardware, serve it, and measure what it bought."""

__version__ = "0.1.0"
