"""`python -m qin ...` (also what `torchrun -m qin train ...` runs)."""

from qin.cli import main

main()
