"""Start-up errors of the model zoo; they stop a replica before it serves anything."""


class ModelZooError(Exception):
    """A model cannot be resolved or loaded; the message names what was looked for and where."""
