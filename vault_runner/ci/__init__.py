"""ci: see README, How it is built."""
