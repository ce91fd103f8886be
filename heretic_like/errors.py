"""The one exception type the CLI turns into a single clear line."""


class HereticError(Exception):
    """A user-facing failure: bad config, missing file, incompatible study. Printed as one line."""
