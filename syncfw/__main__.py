"""``python -m syncfw`` runs the ``syncfw`` command."""

import sys

from syncfw.cli import main

sys.exit(main())
