"""unionfs: an OverlayFS-style union filesystem in userspace (the core; never imports FUSE)."""

__version__ = "0.1.0"
