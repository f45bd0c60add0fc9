"""The gateway's aiohttp application: MCP endpoints, health, and (later) the API and the inbox."""
