"""Hostile input for the intake: payload generators and the pipeline fuzz run (``sluice fuzz``)."""
