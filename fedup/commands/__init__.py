"""The fedup-peer subcommands, one module each: parse, compose, print."""
