"""bol-proxy: a local reverse proxy that attaches cached OAuth2 tokens to bol.com API calls."""

__version__ = "0.1.0"
