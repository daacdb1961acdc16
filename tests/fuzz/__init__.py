"""Fuzzing harnesses (atheris, `make fuzz`) and the pure pipeline they drive."""
