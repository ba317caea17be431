"""The engine: admits jobs, runs them on worker threads, and records how they end."""
