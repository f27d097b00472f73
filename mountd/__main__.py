"""``python -m mountd`` is ``unionfs-mount``."""

import sys

from mountd.cli.mount import main

sys.exit(main())
