"""The exceptions tl_depass raises. Each message says what is wrong and how to fix it."""


class DepassError(ValueError):
    """Bad input to tl_depass: the message names the problem and the fix."""


class UnsupportedModelError(DepassError):
    """The model uses settings DePass cannot decompose exactly; the message lists all of them."""


class NotKeptError(DepassError, KeyError):
    """`dec[hook]` for a hook the decomposition did not keep (also a KeyError, as for a dict)."""

    def __str__(self) -> str:  # KeyError would print the message's repr
        return str(self.args[0]) if self.args else ""
