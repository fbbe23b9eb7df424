"""The testbed around the algorithm core: CLI, experiment runs, comparisons, reports."""
