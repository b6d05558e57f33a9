"""The "cpp" backend: the compiled extension ``structprune._C`` (sources in ``csrc/``) behind the op contract."""
