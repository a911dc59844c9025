"""cli: see README, How it is built."""
