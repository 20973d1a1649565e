"""The engine: one step loop (schedule -> execute -> update) plus the front ends' plumbing.

Boundary: turns prompts and sampling parameters into control-plane requests
and executor outputs back into text. Import submodules directly.
"""
