"""``unionfs build``, the parts that need no mount: the Containerfile parser and its instruction model
(:mod:`.containerfile`), variable expansion (:mod:`.expand`), the build context (:mod:`.context`), the
image state a step works on (:mod:`.state`) and the step cache keys (:mod:`.cachekey`).  The executor that
mounts and runs steps lives in :mod:`mountd.build`."""
