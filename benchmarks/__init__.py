"""Benchmarks of an exported filter: a trained fixture, the accuracy gate, latency and throughput."""
