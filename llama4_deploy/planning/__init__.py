"""Deployment planning from a config alone, and cost tables of a bundle's graphs."""
