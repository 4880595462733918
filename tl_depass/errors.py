"""The exceptions tl_depass raises. Each message says what is wrong and how to fix it."""


class DepassError(ValueError):
    """Bad input to tl_depass: the message names the problem and the fix."""


class UnsupportedModelError(DepassError):
    """The model uses settings DePass cannot decompose exactly; the message lists all of them."""
