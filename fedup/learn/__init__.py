"""The learning layer: torch models, data and training; never touches sockets."""
