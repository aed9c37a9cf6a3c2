"""``python -m proxy.cli``: the same as the ``dpicl`` console script."""

from proxy.cli import main

main()
