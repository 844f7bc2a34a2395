"""The one exception type users see for bad input (a path, tensor or option named in one line)."""


class CqjaxError(ValueError):
    """Bad user input: missing file, wrong tensor shape, unknown option, too little text."""
