"""MCP server for the three agent tools (extra ``mcp``): ``hd4k mcp`` or ``python -m hd4k_tools.mcp``.

:func:`hd4k_tools.mcp.server.build_server` builds the server from an :class:`~hd4k_tools.AgentTools`;
:mod:`hd4k_tools.mcp.cli` parses the options, loads the engine and runs a transport. Importing this
package does not import the MCP SDK.
"""
