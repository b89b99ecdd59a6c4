"""The ``robust-rlhf`` command line: one module per subcommand, assembled by ``main``."""
