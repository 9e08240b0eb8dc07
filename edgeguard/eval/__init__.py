"""`edgeguard eval`: ``run`` (the evaluation), ``data`` (datasets), ``metrics`` (F1 and friends),
``reference`` (the transformers oracle), ``report`` and ``plots`` (the output).
"""
