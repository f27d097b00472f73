"""How every command line ends: exit statuses and the one-line error for the user.

Exit status: ``EXIT_OK`` (0) done; ``EXIT_FAILURE`` (1) the work failed; ``EXIT_USAGE`` (2) the command line
is wrong (argparse uses 2 as well).  A failure is one line on stderr, ``PROG: error: MESSAGE``, with the
message's whitespace (newlines from nested errors included) folded to single spaces.
"""

from __future__ import annotations

import sys

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2


def error(prog: str, message: object) -> None:
    """Write ``PROG: error: MESSAGE`` on stderr as one line."""
    print(f"{prog}: error: {' '.join(str(message).split())}", file=sys.stderr, flush=True)
