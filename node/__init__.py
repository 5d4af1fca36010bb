"""The node: configuration, daemon, JSON-RPC, CLI; the only layer that builds services."""
