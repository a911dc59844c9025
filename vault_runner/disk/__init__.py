"""disk: see README, How it is built."""
