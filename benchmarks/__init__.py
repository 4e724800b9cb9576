"""Speed and memory measurements of referseg, run by ``make bench`` (``python -m benchmarks.run``).

``machine``: what the figures ran on and its measured matmul peak; ``suite``: one function per
benchmark, each returning a JSON-ready dict; ``report``: the markdown table; ``run``: the command.
"""
