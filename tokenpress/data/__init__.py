"""Benchmark data for tokenpress: procedurally generated images and questions (see ``shapes``)."""
