"""State kept by workers behind small interfaces: histories, decayed counts, checkpoints."""
