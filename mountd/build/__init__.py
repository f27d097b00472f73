"""The executor of ``unionfs build``: mounts each step's union, runs RUN steps in a container, copies
COPY/ADD sources, commits the upper dirs (the parts that need no mount are in :mod:`unionfs.image.build`)."""
