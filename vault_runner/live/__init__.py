"""live: see README, How it is built."""
