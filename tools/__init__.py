"""Operator and developer tools for 3GSync (jobsender, local cloud, local sync, benchmark)."""
