"""hmt-serve: an HTTP service for long conversations with HMT sessions whose whole state lives in Redis."""
