"""``unionfs build``, the parts that need no mount: the Containerfile parser and its instruction model
(:mod:`.containerfile`), variable expansion (:mod:`.expand`), the steps with the config after each one
(:mod:`.plan`), the build context (:mod:`.context`), COPY/ADD into an image root and paths and users inside it
(:mod:`.copy`, :mod:`.rootfs`), and the step cache's keys and records (:mod:`.cache`).  The executor that
mounts and runs the steps lives in :mod:`mountd.build`."""
