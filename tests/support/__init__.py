"""Test support: layer trees, real mounts, snapshots and the differential harness."""
