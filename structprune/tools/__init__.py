"""The developer and user tools behind the CLI: demo, info, timing, profiling, the kernel report."""
