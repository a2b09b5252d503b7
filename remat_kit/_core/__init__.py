"""Framework-neutral core: cost graph, budgets, plans, simulator, solvers. Imports neither jax nor torch."""
