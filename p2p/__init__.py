"""The peer-to-peer protocol: framing, handshake, gossip, sync."""
