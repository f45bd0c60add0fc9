"""The MCP side of the gateway: Streamable HTTP handlers, client sessions, upstream connections."""
