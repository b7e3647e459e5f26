"""The command line, the speed benchmark, the bytes-per-token roofline and profiling."""
