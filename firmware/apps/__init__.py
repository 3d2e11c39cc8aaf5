"""Entry points of the roles and operator commands, one package each."""
