"""Executors: turn a `SchedulerOutput` into sampled tokens.

Boundary: `fake` is pure Python (tests and the simulator); `model_runner` and
everything under it is the PyTorch path. Import submodules directly so the
fake never pulls in torch.
"""
