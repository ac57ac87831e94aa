"""The command line: one module per command (``main`` dispatches)."""


def layer_list(text: str, what: str = "--layers") -> tuple:
    """'7,20' -> (7, 20); a clear error naming the option otherwise."""
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise ValueError(f"{what} takes layer indices like 7,20, got {text!r}") from None
