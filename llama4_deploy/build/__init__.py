"""The build pipeline: recipe and options, the steps from checkpoint to bundle, the build cache and --out."""
