"""``python -m edgeguard`` runs the command line."""

from edgeguard.cli import main

main()
