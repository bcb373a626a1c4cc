"""Hand-written Pallas kernels for nagjax, each with a pure-JAX reference it is tested against."""
