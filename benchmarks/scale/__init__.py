"""Scale: hierarchical federations of 1,000 -> 10,000 students, per-round time and memory."""
