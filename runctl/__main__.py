"""``python -m runctl``: the same as the ``runctl`` command."""

from runctl.cli.app import main

if __name__ == "__main__":
    main()
