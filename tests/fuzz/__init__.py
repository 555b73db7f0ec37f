"""Fuzzing of every parser that reads bytes from outside: see README.md in this folder."""
