"""The K students as one module: the population, its fused execution, and where members come from."""
