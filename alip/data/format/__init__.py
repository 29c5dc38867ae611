"""The record format (DESIGN.md section 5), shared by the writer and the readers; imports neither."""
