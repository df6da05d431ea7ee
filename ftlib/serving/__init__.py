"""Layer 2, serving: inference on any model form (generate), the HTTP server and the MLflow pyfunc
every registered version carries. May import core."""
