"""The edge link between a server and its remote clients (see docs/edge.md)."""
