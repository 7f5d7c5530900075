"""Servers that reach the library from other processes: MCP now, HTTP next.

Each is a thin adapter over ``SmolVM``; none holds a second implementation of it.
"""
