"""Building a dictionary: corpus streaming, the mergeable harvest state, sharding, and the build."""
