"""The control socket: newline-delimited JSON RPC for the CLI and the web process."""
