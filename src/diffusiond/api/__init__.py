"""The HTTP layer: validation, routing and the error envelope. No business logic, no torch."""
