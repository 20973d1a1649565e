"""The OpenAI-compatible HTTP server: routes, the async bridge to the engine, metrics.

Boundary: HTTP and asyncio. The engine itself runs on its own thread
(async_engine.py); nothing here steps it directly.
"""
