"""Runs recorded by other tools, converted into run directories."""
