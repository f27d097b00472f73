"""The unionfs FUSE daemon: a thin adapter from the fusepy API to :mod:`unionfs`."""
