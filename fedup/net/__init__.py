"""The trio layer: moves bytes and keeps time; the rules live in fedup.protocol."""
