"""remat_kit's harness: benchmarks, model zoo and reports (outside the library)."""
