"""Compile recipes for TPU topologies on a CPU host (`dlm compile`)."""
