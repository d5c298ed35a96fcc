"""Readers, the record schema and encoders."""
