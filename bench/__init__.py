"""edgeguard benchmark suite: ``python bench/run.py [--quick] [--out bench/results]``."""
