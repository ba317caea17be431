"""Jobs: their states, their data, their ids and the registry that keeps them."""
