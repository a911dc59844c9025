"""frontends: see README, How it is built."""
