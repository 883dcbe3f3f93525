"""`python -m bench.gpu`: see bench/gpu/__init__.py."""

from . import main

main()
