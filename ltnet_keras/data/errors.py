"""The one error type for bad input files."""


class VolumeError(ValueError):
    """A volume, label map or table that cannot be used; the message starts with its path."""

    def __init__(self, source, problem):
        self.source = str(source)
        self.problem = problem
        super().__init__(f"{source}: {problem}" if source else problem)

    def __reduce__(self):   # pickles (``ltnet segment --jobs`` hands errors between processes)
        return type(self), (self.source, self.problem)
