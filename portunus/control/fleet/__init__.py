"""The edge gateway of the control process: server certificate, enrollment,
the TLS link to remote clients (docs/edge.md) and their client operations."""
