"""dga-hf evaluation harness (installed as `dga_eval`): dense vs DGA on real models, apart from the library."""
