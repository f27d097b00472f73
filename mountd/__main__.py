"""``python -m mountd`` is ``unionfs-mount``."""

import sys

from mountd.cli import main

sys.exit(main())
