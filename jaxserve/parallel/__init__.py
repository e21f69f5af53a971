"""Parallelism: the device mesh, how arrays are sharded over it, and several processes."""
