"""``python -m tagmill`` — the same CLI as the ``tagmill`` command (torchrun uses this form)."""

from tagmill.cli import main

main()
