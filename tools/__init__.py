"""Make-target tools (benchmarks, reports, synthetic checkpoints, training), run by the Makefile; outside the
installed package, they use only its public API."""
