"""The pure protocol core: bytes and rules; imports neither trio nor torch nor zeroconf."""
