"""Python client and CLI for jumplora-server (imports neither the server nor torch)."""
