"""Published GHNs (GHN-2, GHN-3): safe readers of their checkpoint files, their graph encoding and networks."""
