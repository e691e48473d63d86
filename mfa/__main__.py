"""``python -m mfa``: the ``mfa`` command (:func:`mfa.cli.main`)."""

import sys

from mfa.cli import main

if __name__ == "__main__":
    sys.exit(main())
