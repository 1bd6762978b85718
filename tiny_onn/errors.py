"""The one exception type for user errors (the CLI prints its message and exits non-zero), and the checks of text every
stage shares."""


class TinyOnnError(ValueError):
    """A problem with the user's input (a path, an option, a file's contents), with a message saying what to do."""


def check_no_lone_surrogates(value: object, where: str) -> None:
    """One clear error when a string in `value` (a parsed JSON record, or text given on the command line) holds a lone
    UTF-16 surrogate: half of a character (a JSON escape such as \\ud83d without its pair, or bytes that are not
    UTF-8 in an argument), which the tokenizers and every UTF-8 writer refuse."""
    strings = [value] if isinstance(value, str) else []
    if isinstance(value, dict):
        strings = [*value.keys(), *value.values()]
    elif isinstance(value, list):
        strings = value
    for item in strings:
        if isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError as err:
                bad = ord(item[err.start])
                raise TinyOnnError(f"{where}: the text holds half of a character (the lone surrogate U+{bad:04X}, "
                                   f"e.g. a JSON escape \\u{bad:04x} without its pair, or bytes that are not UTF-8): "
                                   "remove it or write the whole character") from None
        elif isinstance(item, (dict, list)):
            check_no_lone_surrogates(item, where)
