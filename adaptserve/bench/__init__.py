"""`adaptserve bench`: what the adaptation bought (accuracy) and what serving costs (latency, throughput)."""
