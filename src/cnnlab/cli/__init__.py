"""The ``cnnlab`` command. Each module here with a ``register(subparsers)`` adds a sub-command group."""
