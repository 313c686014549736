"""The `energyvit` commands, one module each with `HELP`, `add_args(parser)` and `run(args)`
(energyvit.cli lists them); the flag helpers they share are in commands.args."""
