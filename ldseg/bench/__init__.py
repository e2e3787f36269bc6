"""Benchmark harness: latency per stage, throughput, FLOPs and roofline, accuracy vs the torch FP32
reference, one results.json + results.md + plots per run (`ldseg-bench`)."""
