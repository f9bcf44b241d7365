"""The one error raised when a dataset is not on disk."""


class DatasetNotFoundError(FileNotFoundError):
    """A dataset's files are missing. The message says where we looked and how to get them."""
