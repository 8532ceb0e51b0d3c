"""The error types of decoding and of bundles, in a module of its own so that every layer can raise it without importing
the loop."""


class DecodeError(ValueError):
    """Bad input to the decoder: empty or too-long prompt, an impossible option, a mode the bundle cannot run."""


class BundleError(ValueError):
    """A bundle that cannot be used: missing, corrupt, for another backbone, or lacking what a mode needs."""
