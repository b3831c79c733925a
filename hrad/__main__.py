"""``python -m hrad``: the ``hrad`` command, for machines where the console script is not on PATH."""

from hrad.cli.main import main

main()
